"""The self-test: every strategy x workload the present devices allow, verified, one row each.

`python -m runner selftest [--device auto|cpu|cuda] [--json]` is the first command on a new machine. It
reports what it finds (torch, CUDA, the NVIDIA driver through NVML, NCCL, gloo, CPU cores), queues one
tiny run per registered strategy (runner.spec.strategies) and workload with verify on (tag `selftest`, so
they land in History like any run), submitted through runner.api, waits for them through the normal runner,
and prints per run: the verdict, step time, peak memory per rank and communication payload beside the leading-order theory. It exits 1 when any run fails or its
verify fails, and when CUDA was asked for but is not usable.

The layouts and their communication theory are runner/spec/selftest_layouts.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from runner import api
from runner.spec.run_spec import RunSpec, SpecError, usable_cores
from runner.spec.selftest_layouts import comm_theory_bytes, selftest_specs


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

    from runner.service.telemetry import detect_gpus

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
                 on_row=None, on_environment=None, options: bool = True,
                 data: str = "synthetic") -> tuple[dict, list[Row], str | None]:  # fmt: skip
    """Check the environment, queue and wait for every run; returns (environment, rows, fatal reason).
    on_environment(line) hears the environment report before anything runs; on_row(row) each finished run;
    options=False leaves out OPTION_VARIANTS (the strategies alone); `data` is every run's (synthetic, stdlib, a corpus)."""
    env = environment()
    if on_environment is not None:
        for line in environment_lines(env):
            on_environment(line)
    device, fatal = resolve_device(requested, env)
    if device is None:
        return env, [], fatal
    gpus = len(env["cuda_devices"]) if device == "cuda" else 0
    planned = selftest_specs(device, gpus, options, data)
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
