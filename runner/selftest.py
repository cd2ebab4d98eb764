"""The self-test: every strategy x workload the present devices allow, verified, one row each.

`python -m runner selftest [--device auto|cpu|cuda] [--json]` is the first command on a new machine. It
reports what it finds (torch, CUDA, the NVIDIA driver through NVML, NCCL, gloo, CPU cores) and the GPUs runs
may use, decided exactly as the runner and the dashboard decide them (runner/service/devices.py: the live
runner's report when one serves this machine, else this machine's devices read the same way), queues one
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


def environment(engine=None) -> dict:
    """What the machine offers, read the way the runner and the job use it: torch's CUDA probed in the runner's
    Python, NVML, and the GPUs runs may use (the live runner's lease for this machine when there is one: that
    runner places the runs). gloo is asked of torch here (the CLI may import torch; the app never does)."""
    from runner.gpt.mesh import gloo_available  # torch.distributed is imported in runner/gpt and runner/job only
    from runner.service.device_probe import detect_devices

    report = detect_devices()
    t, nvml = report.torch, report.nvml
    env: dict = {
        "torch": t.version,
        "torch_cuda": t.cuda,
        "cpu_cores": usable_cores(),
        "gloo": gloo_available(),
        "cuda_available": t.available,
        "cuda_error": t.error,
        "cuda_devices": [g.name for g in t.gpus],
        "nvml_gpus": [f"{g.index} {g.name}" + (" [MIG]" if g.mig else "") for g in nvml.gpus],
        "nvml_note": nvml.error,
        "nccl": t.nccl,
        "driver": nvml.driver,
        "driver_cuda": nvml.cuda_driver,
        "usable_gpus": [f"{g.index} {g.name}" + (f" [busy: pids {', '.join(map(str, g.busy_pids))}]" if g.busy else "")
                        for g in report.gpus],  # fmt: skip
        "gpu_note": report.note(),
        "no_gpu_reason": None if report.gpus else report.no_gpu_reason(),
        "runner": None,
    }
    status = api.runner_status(engine) if engine is not None else None
    if status and status["alive"] and not status.get("cluster"):
        # The runs go to this runner: its report decides (the same function, in its environment).
        env["runner"] = status["pid"]
        env["usable_gpus"] = [f"{g['index']} {g['name']}" + (" [busy]" if g.get("busy_pids") else "")
                              for g in status["gpus"]]  # fmt: skip
        env["gpu_note"] = status["gpu_note"]
        env["no_gpu_reason"] = None if status["gpus"] else status["gpu_note"]
    return env


def environment_lines(env: dict) -> list[str]:
    build = f"CUDA {env['torch_cuda']}" if env["torch_cuda"] else "a CPU-only build"
    cuda = (f"available, {len(env['cuda_devices'])} device(s): {', '.join(env['cuda_devices'])}"
            if env["cuda_available"] else f"not available ({env['cuda_error'] or 'no device'})")  # fmt: skip
    whose = f"the runner serving this machine (pid {env['runner']})" if env["runner"] else "this machine's runner"
    usable = ", ".join(env["usable_gpus"]) if env["usable_gpus"] else "none"
    return [
        f"torch {env['torch']} ({build}), {env['cpu_cores']} CPU cores usable, "
        f"gloo {'available' if env['gloo'] else 'MISSING'}",
        f"NVIDIA driver: {env['driver'] or 'not found'}"
        + (f" (supports CUDA {env['driver_cuda']} at most)" if env["driver_cuda"] else "")
        + (f" ({env['nvml_note']})" if env["nvml_note"] else ""),
        f"NVML GPUs: {', '.join(env['nvml_gpus']) or 'none'}",
        f"CUDA in torch: {cuda}",
        f"NCCL: {env['nccl'] or 'not available'}",
        f"GPUs runs may use, as {whose} decides: {usable}",
        f"  {env['gpu_note']}",
    ]


def resolve_device(requested: str, env: dict) -> tuple[str | None, str | None]:
    """('cpu' | 'cuda', None), or (None, why) when CUDA was asked for and cannot be used: the runner's own
    sentence (a CPU-only torch, a driver too old for its CUDA, no driver, every GPU excluded or in MIG mode)."""
    if requested == "cpu":
        return "cpu", None
    if requested == "cuda" and not env["usable_gpus"]:
        return None, f"CUDA was asked for but {env['no_gpu_reason'] or 'no GPU is usable'}"
    return ("cuda" if env["usable_gpus"] else "cpu"), None


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
                 on_row=None, on_environment=None, options: bool = True, data: str = "synthetic",
                 strategies: tuple[str, ...] = ()) -> tuple[dict, list[Row], str | None]:  # fmt: skip
    """Check the environment, queue and wait for every run; returns (environment, rows, fatal reason).
    on_environment(line) hears the environment report before anything runs; on_row(row) each finished run;
    options=False leaves out OPTION_VARIANTS (the strategies alone); `data` is every run's (synthetic, stdlib, a
    corpus); `strategies` keeps those strategies' rows only (empty: all)."""
    env = environment(engine)
    if on_environment is not None:
        for line in environment_lines(env):
            on_environment(line)
    device, fatal = resolve_device(requested, env)
    if device is None:
        return env, [], fatal
    gpus = len(env["usable_gpus"]) if device == "cuda" else 0
    planned = selftest_specs(device, gpus, options, data, strategies)
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
    if row.run_id is None:  # not run: skipped for the devices, or refused (its reasons below it)
        word = "ERROR" if row.verdict == "error" else "SKIP"
        return f"{word:5} {row.label}" + "".join(f"\n      {failure}" for failure in row.failures)
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
