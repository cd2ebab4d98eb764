"""Does the tiny model learn real text on this CPU, and does every strategy's loss curve follow a single device's?

The convergence check itself (runner/converge.py through runner.api.submit_converge), run as a user runs it,
through the real runner in a fresh LAB_HOME: every registered strategy at its smallest layout trains the
tiny preset (4 layers, width 64, the 256 byte symbols) on this Python's standard library sources (byte-level,
the last tenth held out) for N steps from the same seed, batch 8 x 64 tokens, AdamW at lr 3e-3. Reported:
- the single device's learning: its loss at step 0 (about ln 256 = 5.545 for an untrained model), the mean
  of its last 10 steps, its held-out loss at the end, and the wall time of its run (process start included);
- each strategy's largest relative deviation |loss - single| / single over the first EARLY steps, the first
  100 and all N, and the first step where it passed 1e-4 -- the measurement the float32 bound of
  runner/spec/converge_layouts.py rests on;
- the same check in bf16-mixed over fewer steps, against the single device in bf16-mixed.

Run: `python bench/bench_converge.py` (`--quick` or BENCH_QUICK=1: fewer steps). It writes the
"## Convergence on real text" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import machine_lines, quick_mode, write_section  # noqa: E402

FULL = {"steps": 300, "bf16_steps": 100, "eval_every": 25}
QUICK = {"steps": 40, "bf16_steps": 20, "eval_every": 10}
WINDOWS = (30, 100)  # the early window the float32 bound judges (converge_layouts.EARLY_STEPS), and 100 steps


def curves_of(engine, ids: list[int]) -> dict[int, dict[str, dict[int, float | None]]]:
    from runner import api

    out: dict[int, dict[str, dict[int, float | None]]] = {}
    for run_id, g in api.loss_curves(engine, ids).groupby("run_id"):
        out[int(run_id)] = {c: {int(s): (None if v != v else float(v)) for s, v in zip(g["step"], g[c], strict=True)}
                            for c in ("loss", "eval_loss")}  # fmt: skip
    return out


def check(engine, steps: int, dtype: str, eval_every: int, timeout_s: float) -> dict:
    """One convergence check: queue, wait, read back every run's curve and timing."""
    from runner import api
    from runner.converge import wait

    tag, queued = api.submit_converge(engine, None, "cpu", settings={"steps": steps, "dtype": dtype,
                                                                     "eval_every": eval_every})  # fmt: skip
    ids = [i for _, i in queued if i is not None]
    t0 = time.monotonic()
    wait(engine, ids, timeout_s)
    runs = {i: api.get_run(engine, i) for i in ids}
    return {"tag": tag, "queued": queued, "runs": runs, "curves": curves_of(engine, ids),
            "wall_s": time.monotonic() - t0}  # fmt: skip


def deviations(result: dict) -> list[dict]:
    """Per strategy: its deviation from the single device's curve over each window and all steps."""
    from runner.job.metrics import curve_deviation, relative_deviations

    base_id = result["queued"][0][1]
    base = result["curves"][base_id]["loss"]
    rows = []
    for label, run_id in result["queued"][1:]:
        run = result["runs"].get(run_id)
        curve = result["curves"].get(run_id, {}).get("loss", {})
        per_step = relative_deviations(base, curve)
        row = {"label": label, "status": run["status"] if run else "skipped",
               "steps": len(per_step), "first_above_1e-4": next((s for s, d in per_step.items() if d > 1e-4), None),
               "all": curve_deviation(base, curve)}  # fmt: skip
        for w in WINDOWS:
            row[w] = curve_deviation({s: v for s, v in base.items() if s < w}, curve)
        rows.append(row)
    return rows


def learning(result: dict) -> dict:
    base_id = result["queued"][0][1]
    loss = [v for v in result["curves"][base_id]["loss"].values() if v is not None]
    evals = [(s, v) for s, v in result["curves"][base_id]["eval_loss"].items() if v is not None]
    run = result["runs"][base_id]
    from datetime import datetime

    took = (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])).total_seconds()
    return {"first": loss[0], "last10": sum(loss[-10:]) / len(loss[-10:]), "steps": len(loss),
            "evals": evals, "run_s": took, "step_p50": (run["result"] or {}).get("step_time_s_p50")}  # fmt: skip


def _e(x: float | None) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.1e}")


def table(rows: list[dict], steps: int) -> list[str]:
    windows = [w for w in WINDOWS if w < steps]
    head = "| strategy | " + " | ".join(f"largest deviation, steps 0-{w - 1}" for w in windows)
    head += f" | largest deviation, all {steps} steps (at step) | first step above 1e-4 |"
    out = [head, "|" + "---|" * (3 + len(windows))]
    for r in rows:
        cells = [_e(r[w].largest) for w in windows]
        whole = r["all"]
        out.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_e(whole.largest)} (step {whole.at_step}) | "
                   f"{r['first_above_1e-4'] if r['first_above_1e-4'] is not None else 'never'} |")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    cfg = QUICK if quick_mode(args.quick) else FULL
    home = tempfile.mkdtemp(prefix="bench-converge-")
    os.environ["LAB_HOME"] = home  # a fresh database and corpus cache; the runner started below inherits it
    os.environ.pop("LAB_DB_URL", None)
    from runner import api
    from runner.service.launch import stop_group
    from storage.db import get_engine

    engine = get_engine()
    api.ensure_runner()
    if not api.wait_for_runner(engine):
        raise SystemExit(f"no runner came up; see {home}/runner.log")
    try:
        f32 = check(engine, cfg["steps"], "float32", cfg["eval_every"], 3600)
        bf16 = check(engine, cfg["bf16_steps"], "bf16-mixed", cfg["eval_every"], 3600)
    finally:
        status = api.runner_status(engine)
        if status:
            stop_group(status["pid"], 10.0)
    learn = learning(f32)
    rows32, rows16 = deviations(f32), deviations(bf16)
    failed = [r["label"] for r in rows32 + rows16 if r["status"] != "succeeded"]
    ln256 = math.log(256)
    last_eval = learn["evals"][-1] if learn["evals"] else (None, None)
    lines = [
        "## Convergence on real text",
        "",
        "`python bench/bench_converge.py`: the convergence check (`python -m runner converge`) through the real "
        "runner, every strategy at its smallest layout, the tiny preset on this Python's standard library sources "
        "(byte-level, vocabulary 256), batch 8 x 64 tokens, AdamW lr 3e-3, seed 0.",
        "",
        *machine_lines(),
        "",
        f"**The tiny model learns the corpus.** On one CPU rank its loss fell from {learn['first']:.3f} at step 0 "
        f"(ln 256 = {ln256:.3f}: an untrained model spreads its bet over the 256 bytes) to {learn['last10']:.3f} "
        f"(mean of its last 10 of {learn['steps']} steps); the held-out loss at step {last_eval[0]} was "
        f"{last_eval[1]:.3f}, so it learned the text rather than the batches it saw. The run took "
        f"{learn['run_s'] / 60:.1f} min (process start, corpus cache and the timed steps; step p50 "
        f"{learn['step_p50'] * 1e3:.0f} ms).",
        "",
        f"**float32, {cfg['steps']} steps.** Each strategy's training loss against the single device's, "
        "|loss - single| / single per step:",
        "",
        *table(rows32, cfg["steps"]),
        "",
        f"**bf16-mixed, {cfg['bf16_steps']} steps**, against the single device in bf16-mixed:",
        "",
        *table(rows16, cfg["bf16_steps"]),
        "",
        *(["Runs that did not succeed: " + ", ".join(failed), ""] if failed else []),
    ]
    write_section("Convergence on real text", "\n".join(lines), Path(args.out))
    print("\n".join(lines))
    print(f"(runs kept in {home})")


if __name__ == "__main__":
    main()
