"""The self-test: every strategy x workload the present devices allow, verified, one row each.

`python -m runner selftest [--device auto|cpu|cuda] [--json]` is the first command on a new machine. It
reports what it finds (torch, CUDA, the NVIDIA driver through NVML, NCCL, gloo, CPU cores), queues one
tiny run per registered strategy (runner.strategies) and workload with verify on (tag `selftest`, so they
land in History like any run), submitted through runner.api, waits for them through the normal runner, and prints per run: the verdict, step time, peak memory per
rank and communication payload beside the leading-order theory. It exits 1 when any run fails or its
verify fails, and when CUDA was asked for but is not usable.

Layouts are the smallest that exercise each strategy: two ranks per degree it uses, 3D as 2x2x2 when
eight ranks fit (always on CPU, where ranks are processes; on GPUs only with eight of them) and 2x2x1
with four GPUs. A layout that needs more GPUs than present is listed as skipped, with the reason.

Communication theory (`comm_theory_bytes`) is the leading order of the textbook picture, summed over
ranks, one step, payload bytes with the project's one convention (docs/run-folder.md); what it leaves out
is small at this size and is shown as the measured remainder, not hidden:
- tensor (Megatron): 2 all-reduces of [tokens, h] per layer forward and 2 more backward (Shoeybi et
  al., 2019), plus the vocabulary-parallel embedding's all-reduce forward and the LM head input's backward,
  on each of the tp ranks; a forward workload all-gathers the logits [tokens, V] to every tp rank of the
  last stage (the loss's per-token all-reduces and generate's next-token logits left out);
- layer / pipeline: one activation of [tokens, h] across each of the p - 1 stage boundaries forward, and
  its gradient backward; in training the first and last stage all-reduce the tied embedding's gradient
  [V, h] (its vocabulary slice under tensor parallelism) in every (tp, dp) column (generated tokens left out);
- data: every rank all-reduces the gradient of every parameter once per training step (the loss
  all-reduce left out); with ZeRO, ZERO_PASSES of the model's bytes;
- 3d: the three combined over the mesh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from runner import api
from runner.gpt.config import count_parameters
from runner.spec import RunSpec, SpecError, usable_cores
from runner.strategies import get_strategy, strategy_names

# A tiny run takes seconds; a hang (a deadlocked exchange) must fail its row, not stall the self-test.
BASE = RunSpec(model="tiny", batch=8, seq=32, new_tokens=4, steps=2, warmup=1, verify=True, time_limit_s=120.0,
               tags=("selftest",))  # fmt: skip
WORKLOADS = ("forward", "generate", "train")
# Passes of the model's bytes per data-parallel rank and step, in the payload convention (an all-reduce's payload
# is its tensor, a reduce-scatter's its full input, an all-gather's its full output; Rajbhandari et al. 2020,
# section 7): plain all-reduce 1; ZeRO-1 all-reduce + all-gather 2; ZeRO-2 reduce-scatter + all-gather 2.
# ZeRO-3 (zero3_bytes) gathers every block before its forward and again before its backward -- per microbatch
# inside a pipeline -- and keeps the embeddings and final LayerNorm gathered for the whole step (FSDP's root
# unit), then reduce-scatters every gradient once.
ZERO_PASSES = {0: 1, 1: 2, 2: 2}


# What the self-test adds to the smallest layout (2 for every degree a strategy uses): microbatches where a
# strategy takes them (3D's eight ranks keep 2, so its CPU run stays short), and the schedules tested beside
# the default one (in training only; 3D runs the same pipeline engine, so gpipe is tested once).
MICROBATCHES = {"3d": 2}
DEFAULT_MICROBATCHES = 4
MORE_SCHEDULES = {"pipeline": ("gpipe",)}
# Issue 14's options, each on the smallest layout that exercises it, in training (what they change): ZeRO stages
# alone and as 3D's data dimension, the interleaved and zero-bubble schedules, activation checkpointing, and
# bf16-mixed precision (verified against its own documented bound, runner/verify.py).
OPTION_VARIANTS: dict[str, list[dict]] = {
    "pipeline": [{"schedule": "interleaved-1f1b", "virtual_stages": 2}, {"schedule": "zb-h1"},
                 {"checkpoint": "blocks"}, {"dtype": "bf16-mixed"}],
    "data": [{"zero_stage": 1}, {"zero_stage": 2}, {"zero_stage": 3}],
    "3d": [{"zero_stage": 3}],
    "single": [{"checkpoint": "every-2"}],
}  # fmt: skip
SHORT = {"schedule": "", "dtype": "", "virtual_stages": "v", "zero_stage": "zero", "checkpoint": "checkpoint"}


def layouts(gpus: int, device: str, options: bool = True) -> list[tuple[RunSpec, str, str | None]]:
    """(spec without workload, label, why it cannot run here or None) per registered strategy, and per extra
    schedule. A layout over several degrees that does not fit drops data parallelism first (3D as 2x2x1 on
    four GPUs)."""
    budget = gpus if device == "cuda" else 8  # CPU ranks are processes: the 3D layout of 8 always fits
    rows = []
    for name in strategy_names():
        strategy = get_strategy(name)
        fields: dict = {d: max(2, strategy.min_degree.get(d, 2)) for d in strategy.degrees}
        if strategy.uses("microbatches"):
            fields["microbatches"] = MICROBATCHES.get(name, DEFAULT_MICROBATCHES)
        spec = replace(BASE, strategy=name, **fields)
        if spec.world_size > budget and len(strategy.degrees) > 1 and "dp" in fields:
            spec = replace(spec, dp=1)
        label = " ".join([name, *(f"{d}={getattr(spec, d)}" for d in strategy.degrees)])
        label += f" m={spec.microbatches}" if strategy.uses("microbatches") else ""
        variants = [(spec, label)]
        if name in MORE_SCHEDULES:
            variants = [(replace(spec, schedule=x), f"{label} {x}") for x in (spec.schedule, *MORE_SCHEDULES[name])]
        for changes in OPTION_VARIANTS.get(name, []) if options else []:
            if "zero_stage" in changes and spec.dp < 2:
                continue  # 3D without its data dimension here (too few GPUs): nothing to shard over
            words = [f"{SHORT[k]}={v}" if SHORT[k] else str(v) for k, v in changes.items()]
            variants.append((replace(spec, **changes), " ".join([label, *words])))
        for variant, text in variants:
            too_many = variant.world_size > budget
            rows.append((variant, text, f"needs {variant.world_size} GPUs, {gpus} present" if too_many else None))
    return rows


def selftest_specs(device: str, gpus: int, options: bool = True) -> list[tuple[RunSpec | None, str]]:
    """Every (spec, label) of the self-test on `device` ('cpu' or 'cuda'); spec None where skipped.
    A schedule other than the default (gpipe beside 1f1b) differs only in training, so it is tested there
    alone. CPU layouts do not depend on the core count: an oversubscribed run says so in its result."""
    rows: list[tuple[RunSpec | None, str]] = []
    for spec, label, reason in layouts(gpus, device, options):
        for workload in WORKLOADS:
            if workload != "train" and (spec.schedule != BASE.schedule or _is_option_variant(spec)):
                continue
            if reason is not None:
                rows.append((None, f"{label} {workload} skipped ({reason})"))
            else:
                rows.append((replace(spec, workload=workload, device=device), f"{label} {workload}"))
    return rows


def _is_option_variant(spec: RunSpec) -> bool:
    """Whether `spec` is one of OPTION_VARIANTS (tested in training only)."""
    return (spec.zero_stage, spec.checkpoint, spec.dtype, spec.virtual_stages) != (0, "none", BASE.dtype, 1)


def comm_theory_bytes(spec: RunSpec) -> int:
    """Leading-order communication payload of one step, summed over ranks (see the module docstring)."""
    cfg = spec.model_config()
    elem = 2 if spec.dtype == "bfloat16" else 4
    tp, pp, dp = spec.degrees
    tokens = spec.batch * (spec.seq + spec.new_tokens - 1 if spec.workload == "generate" else spec.seq)
    activation = tokens * cfg.n_embd * elem  # one [tokens, h] tensor over the global batch
    directions = 2 if spec.workload == "train" else 1
    total = 0
    vocab = -(-cfg.vocab_size // tp) * tp  # padded to a multiple of tp
    if tp > 1:  # every tp rank all-reduces each layer's two partial sums; pp stages and dp replicas split the work
        total += directions * (2 * cfg.n_layer + 1) * activation * tp
        if spec.dtype == "bf16-mixed":  # the layers' forward partial sums come out of bf16 matmuls: half the bytes
            total -= cfg.n_layer * activation * tp
        if spec.workload == "forward":
            total += tp * spec.batch * spec.seq * vocab * elem
    if pp > 1:  # every tp rank of a boundary sends its (replicated) activation; v chunks a rank: pp*v - 1 boundaries
        total += directions * (pp * spec.virtual_stages - 1) * activation * tp
        if spec.workload == "train":  # two ranks per (tp, dp) column, each with a V/tp slice
            total += 2 * dp * vocab * cfg.n_embd * elem
    if dp > 1 and spec.workload == "train" and spec.zero_stage == 3:
        outer = (cfg.vocab_size + cfg.block_size + 2) * cfg.n_embd
        blocks = count_parameters(cfg) - outer
        gathers = spec.microbatches if pp > 1 else 1  # a pipeline runs each block once per microbatch
        total += dp * elem * (2 * gathers * blocks + outer + count_parameters(cfg))
    elif dp > 1 and spec.workload == "train":  # ZeRO-1 and 2 add an all-gather of the updated weights
        total += dp * count_parameters(cfg) * elem * ZERO_PASSES[spec.zero_stage]
    return total


@dataclass
class Row:
    label: str
    run_id: int | None = None
    status: str = "skipped"
    verdict: str = "skipped"
    step_time_s: float | None = None
    peak_mem_bytes: list[int] = field(default_factory=list)
    comm_bytes: int | None = None  # payload of one step, summed over ranks
    comm_theory_bytes: int | None = None
    failures: list[str] = field(default_factory=list)
    oversubscribed: bool = False

    @property
    def ok(self) -> bool:
        return self.verdict in ("pass", "skipped")


def environment() -> dict:
    """What the machine offers, read the way the job will use it (torch is imported here, not in the app)."""
    import torch
    import torch.distributed as dist

    from runner.telemetry import detect_gpus

    gpus = detect_gpus()
    env: dict = {
        "torch": torch.__version__,
        "cpu_cores": usable_cores(),
        "gloo": dist.is_gloo_available(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "nvml_gpus": [g["name"] for g in gpus],
        "nvml_note": gpus.reason,
        "nccl": None,
        "driver": None,
    }
    if torch.cuda.is_available() and dist.is_nccl_available():
        version = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    try:
        import pynvml

        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no driver to report"
        env["driver"] = None
        env["driver_note"] = f"{type(exc).__name__}: {exc}"[:200]
    return env


def environment_lines(env: dict) -> list[str]:
    lines = [
        f"torch {env['torch']}, {env['cpu_cores']} CPU cores usable, gloo {'available' if env['gloo'] else 'MISSING'}",
        f"NVIDIA driver: {env['driver'] or 'not found'}"
        + ("" if env["driver"] else f" ({env.get('driver_note', '')})"),
        f"NVML GPUs: {', '.join(env['nvml_gpus']) or 'none'}" + (f" ({env['nvml_note']})" if env["nvml_note"] else ""),
        f"CUDA in torch: {'available, ' + ', '.join(env['cuda_devices']) if env['cuda_available'] else 'not available'}",
        f"NCCL: {env['nccl'] or 'not available'}",
    ]
    return lines


def resolve_device(requested: str, env: dict) -> tuple[str | None, str | None]:
    """('cpu' | 'cuda', None), or (None, why) when CUDA was asked for and cannot be used."""
    if requested == "cpu":
        return "cpu", None
    usable = env["cuda_available"] and env["nccl"] is not None and env["cuda_devices"]
    if requested == "cuda" and not usable:
        why = "CUDA was asked for but " + (
            "torch sees no CUDA device" if not env["cuda_available"] else "NCCL is not available in this torch build"
        )
        return None, why
    return ("cuda" if usable else "cpu"), None


def collect(engine, run_id: int, label: str, spec: RunSpec) -> Row:
    run = api.get_run(engine, run_id)
    row = Row(label=label, run_id=run_id, status=run["status"], comm_theory_bytes=comm_theory_bytes(spec))
    result = run.get("result") or {}
    verify = result.get("verify") or {}
    if run["status"] != "succeeded":
        row.verdict = "error"
        row.failures = [run.get("error") or f"run ended {run['status']}"]
    elif verify.get("passed") is True:
        row.verdict = "pass"
    else:
        row.verdict = "fail"
        row.failures = list(verify.get("failures") or ["verify gave no verdict"])
    row.step_time_s = result.get("step_time_s_p50")
    ranks = sorted(run.get("ranks") or [], key=lambda r: r["rank"])
    row.peak_mem_bytes = [int(r.get("peak_mem_bytes") or 0) for r in ranks]
    if ranks:  # the job counts every timed step; the theory is one step
        row.comm_bytes = sum(sum((r.get("comm_bytes") or {}).values()) for r in ranks) // max(1, spec.steps)
    row.oversubscribed = bool(result.get("cpu_oversubscribed"))
    return row


def run_selftest(engine, requested: str = "auto", user: str | None = None, timeout_s: float = 600.0,
                 on_row=None, on_environment=None, options: bool = True) -> tuple[dict, list[Row], str | None]:  # fmt: skip
    """Check the environment, queue and wait for every run; returns (environment, rows, fatal reason).
    on_environment(line) hears the environment report before anything runs; on_row(row) each finished run;
    options=False leaves out OPTION_VARIANTS (the strategies alone)."""
    env = environment()
    if on_environment is not None:
        for line in environment_lines(env):
            on_environment(line)
    device, fatal = resolve_device(requested, env)
    if device is None:
        return env, [], fatal
    gpus = len(env["cuda_devices"]) if device == "cuda" else 0
    planned = selftest_specs(device, gpus, options)
    rows: list[Row] = []
    queued: list[tuple[int, str, RunSpec]] = []
    for spec, label in planned:
        if spec is None:
            rows.append(Row(label=label))
            continue
        try:
            queued.append((api.submit(engine, spec, user=user, gpu_count=gpus), label, spec))
        except SpecError as exc:
            rows.append(Row(label=label, status="refused", verdict="error", failures=[str(exc)]))
    api.ensure_runner()
    if not api.wait_for_runner(engine):
        return env, rows, "no runner came up within 30 s; see LAB_HOME/runner.log"
    deadline = time.monotonic() + timeout_s
    for run_id, label, spec in queued:
        while not api.is_terminal(api.get_run(engine, run_id)["status"]):
            if time.monotonic() > deadline:
                api.cancel(engine, run_id)
                break
            time.sleep(0.3)
        row = collect(engine, run_id, label, spec)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return env, rows, None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_row(row: Row) -> str:
    if row.run_id is None:
        return f"{'SKIP':5} {row.label}"
    step = f"{row.step_time_s * 1e3:8.1f} ms" if row.step_time_s is not None else "       - ms"
    mem = "/".join(_mib(b) for b in row.peak_mem_bytes) or "-"
    comm = "-"
    if row.comm_bytes is not None:
        comm = f"{row.comm_bytes:,} B"
        if row.comm_theory_bytes:
            comm += f" (theory {row.comm_theory_bytes:,} B, x{row.comm_bytes / row.comm_theory_bytes:.2f})"
        elif row.comm_theory_bytes == 0:
            comm += " (theory 0 B)"
    line = f"{row.verdict.upper():5} run {row.run_id:<5} {row.label:40} {step}  peak MiB/rank {mem:24} comm {comm}"
    if row.oversubscribed:
        line += "  [oversubscribed]"
    for failure in row.failures:
        line += f"\n      {failure}"
    return line
