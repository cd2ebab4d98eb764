"""Does the tiny model learn real text on this CPU, and does every strategy's loss curve follow a single device's?

The convergence check itself (runner/analysis/converge.py through runner.api.submit_converge), run as a user runs it,
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
"## Convergence on real text" section of bench/RESULTS.md and keeps its LAB_HOME; `--report LAB_HOME` writes
the section again from the runs kept there, without running anything.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import machine_lines, quick_mode, write_section  # noqa: E402

FULL = {"steps": 300, "bf16_steps": 100, "eval_every": 25}
QUICK = {"steps": 40, "bf16_steps": 20, "eval_every": 10}
WINDOWS = (20, 30, 100)  # the early windows bf16 and float32 are judged over (converge_layouts.BOUNDS), and 100


def curves_of(engine, ids: list[int]) -> dict[int, dict[str, dict[int, float | None]]]:
    import pandas as pd

    from runner import api

    out: dict[int, dict[str, dict[int, float | None]]] = {}
    for run_id, g in api.loss_curves(engine, ids).groupby("run_id"):
        out[int(run_id)] = {c: {int(s): (None if pd.isna(v) else float(v)) for s, v in zip(g["step"], g[c], strict=True)}
                            for c in ("loss", "eval_loss")}  # fmt: skip
    return out


def check(engine, steps: int, dtype: str, eval_every: int, timeout_s: float) -> str:
    """One convergence check: queue it, wait for its runs; returns its tag."""
    from runner import api
    from runner.analysis.converge import wait

    tag, queued = api.submit_converge(engine, None, "cpu", settings={"steps": steps, "dtype": dtype,
                                                                     "eval_every": eval_every})  # fmt: skip
    wait(engine, [i for _, i in queued if i is not None], timeout_s)
    return tag


def load(engine, tag: str) -> dict:
    """A check's runs read back by its tag (single first, then the registry's order), with their curves."""
    from runner import api
    from runner.spec.converge_layouts import converge_specs

    ids = sorted(int(i) for i in api.list_runs(engine, api.RunFilter(tag=[tag]), limit=100)["id"])
    runs = {i: api.get_run(engine, i) for i in ids}
    labels = {spec.strategy: label for spec, label in converge_specs(device="cpu", gpus=0) if spec}
    queued = [(labels.get(runs[i]["spec"]["strategy"], runs[i]["spec"]["strategy"]), i) for i in ids]
    return {"tag": tag, "queued": queued, "runs": runs, "curves": curves_of(engine, ids),
            "dtype": runs[ids[0]]["spec"]["dtype"], "steps": runs[ids[0]]["spec"]["steps"]}  # fmt: skip


def deviations(result: dict) -> list[dict]:
    """Per strategy: its deviation from the single device's curve over each window and all steps."""
    from runner.job.metrics import curve_deviation, relative_deviations
    from runner.spec.converge_layouts import judge

    base_id = result["queued"][0][1]
    base = result["curves"][base_id]["loss"]
    rows = []
    for label, run_id in result["queued"][1:]:
        run = result["runs"].get(run_id)
        curve = result["curves"].get(run_id, {}).get("loss", {})
        per_step = relative_deviations(base, curve)
        row = {"label": label, "status": run["status"] if run else "skipped",
               "steps": len(per_step), "first_above_1e-4": next((s for s, d in per_step.items() if d > 1e-4), None),
               "all": curve_deviation(base, curve), "verdict": (j := judge(base, curve, result["dtype"])).verdict,
               "judged": j.early_judged,
               "held_out": last_held_out(result, run_id)}  # fmt: skip
        for w in WINDOWS:
            row[w] = curve_deviation({s: v for s, v in base.items() if s < w}, curve)
        rows.append(row)
    return rows


def last_held_out(result: dict, run_id: int) -> float | None:
    evals = [v for v in result["curves"].get(run_id, {}).get("eval_loss", {}).values() if v is not None]
    return evals[-1] if evals else None


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


def table(rows: list[dict], result: dict) -> list[str]:
    from runner.spec.converge_layouts import bound_of

    steps, base_id = result["steps"], result["queued"][0][1]
    windows = [w for w in WINDOWS if w < steps]
    head = "| strategy | " + " | ".join(f"steps 0-{w - 1}" for w in windows)
    b = bound_of(result["dtype"])
    judged = f"{'median' if b.early_median else 'largest'}, steps 0-{b.early_steps - 1} (bound {b.early:.0e})"
    head += f" | all {steps} steps (at step) | first step above 1e-4 | {judged} | held-out loss at the end | verdict |"
    out = [head, "|" + "---|" * (6 + len(windows)),
           f"| single (the baseline) | {' | '.join('-' for _ in windows)} | - | - | - | "
           f"{_f(last_held_out(result, base_id))} | |"]  # fmt: skip
    for r in rows:
        cells = [_e(r[w].largest) for w in windows]
        whole = r["all"]
        first = r["first_above_1e-4"] if r["first_above_1e-4"] is not None else "never"
        out.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_e(whole.largest)} (step {whole.at_step}) | "
                   f"{first} | {_e(r['judged'])} | {_f(r['held_out'])} | {r['verdict']} |")  # fmt: skip
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def float32_sentence(rows: list[dict], result: dict) -> str:
    from runner.spec.converge_layouts import bound_of

    b = bound_of("float32")
    early = max(rows, key=lambda r: r[b.early_steps].largest)
    worst = max(rows, key=lambda r: r["all"].largest)
    crossed = [r for r in rows if r["first_above_1e-4"] is not None]
    first = min(crossed, key=lambda r: r["first_above_1e-4"]) if crossed else None
    text = (f"Over the first {b.early_steps} steps every curve stayed within {early[b.early_steps].largest:.1e} of the "
            f"single device's ({early['label']}; bound {b.early:.0e}).")  # fmt: skip
    if first is not None:
        text += (f" Amplified rounding passed 1e-4 first at step {first['first_above_1e-4']} ({first['label']}) and "
                 f"reached at most {worst['all'].largest:.1e} ({worst['label']}, step {worst['all'].at_step}) over "
                 f"{result['steps']} steps (bound {b.whole:.0e}).")  # fmt: skip
    return text


def bf16_sentence(rows: list[dict], result: dict, f32: dict) -> str:
    from runner.spec.converge_layouts import bound_of

    b = bound_of(result["dtype"])
    early = max(rows, key=lambda r: r["judged"])
    spike = max(rows, key=lambda r: r[b.early_steps].largest)
    worst = max(rows, key=lambda r: r["all"].largest)
    base = last_held_out(result, result["queued"][0][1])
    spread = [(r["label"], r["held_out"] / base - 1) for r in rows if r["held_out"] is not None and base]
    far = max(spread, key=lambda x: abs(x[1])) if spread else None
    text = (f"Over the first {b.early_steps} steps the median deviation was at most {early['judged']:.1e} "
            f"({early['label']}; bound {b.early:.0e}), the largest {spike[b.early_steps].largest:.1e} ({spike['label']}); "
            f"over {result['steps']} steps up to {worst['all'].largest:.1e} ({worst['label']}, step "
            f"{worst['all'].at_step}), reported, not judged.")  # fmt: skip
    if far is not None:
        step = max(s for s, v in result["curves"][result["queued"][0][1]]["eval_loss"].items() if v is not None)
        f32_at = {i: c["eval_loss"].get(step) for i, c in f32["curves"].items()}
        f32_base = f32_at[f32["queued"][0][1]]
        f32_spread = max(abs(v / f32_base - 1) for v in f32_at.values() if v is not None)
        text += (f" At step {step} the held-out losses of the bf16-mixed runs differ from the single device's by up "
                 f"to {far[1]:+.1%} ({far[0]}), where float32's differed by at most {f32_spread:.2%} at the same "
                 "step.")  # fmt: skip
    return text


def report(engine, tags: tuple[str, str], out: Path) -> str:
    """The section, from the two checks' runs as stored."""
    f32, bf16 = load(engine, tags[0]), load(engine, tags[1])
    learn = learning(f32)
    rows32, rows16 = deviations(f32), deviations(bf16)
    failed = [r["label"] for r in rows32 + rows16 if r["status"] != "succeeded"]
    last_eval = learn["evals"][-1] if learn["evals"] else (None, None)
    lines = [
        "## Convergence on real text",
        "",
        "`python bench/bench_converge.py`: the convergence check (`python -m runner converge`) through the real "
        "runner, every strategy at its smallest layout, the tiny preset on this Python's standard library sources "
        "(byte-level, vocabulary 256), batch 8 x 64 tokens, AdamW lr 3e-3, seed 0. Deviation: |loss - single| / "
        "single of the training loss per step, its largest over each span of steps; verdicts against "
        "runner/spec/converge_layouts.py's bounds.",
        "",
        *machine_lines(),
        "",
        f"**The tiny model learns the corpus.** On one CPU rank its loss fell from {learn['first']:.3f} at step 0 "
        f"(ln 256 = {math.log(256):.3f}: an untrained model spreads its bet over the 256 bytes) to "
        f"{learn['last10']:.3f} (mean of its last 10 of {learn['steps']} steps); the held-out loss at step "
        f"{last_eval[0]} was {last_eval[1]:.3f}, so it learned the text, not only the batches it saw. The run took "
        f"{learn['run_s'] / 60:.1f} min (process start, corpus cache and the steps; step p50 "
        f"{learn['step_p50'] * 1e3:.0f} ms on this loaded machine).",
        "",
        f"**float32, {f32['steps']} steps.** {float32_sentence(rows32, f32)}",
        "",
        *table(rows32, f32),
        "",
        f"**bf16-mixed, {bf16['steps']} steps**, against the single device in bf16-mixed. "
        f"{bf16_sentence(rows16, bf16, f32)}",
        "",
        *table(rows16, bf16),
        "",
        *(["Runs that did not succeed: " + ", ".join(failed), ""] if failed else []),
    ]
    text = "\n".join(lines)
    write_section("Convergence on real text", text, out)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--report", metavar="LAB_HOME", help="write the section from the runs kept in LAB_HOME")
    args = parser.parse_args()
    cfg = QUICK if quick_mode(args.quick) else FULL
    home = args.report or tempfile.mkdtemp(prefix="bench-converge-")
    os.environ["LAB_HOME"] = home  # a fresh database and corpus cache; the runner started below inherits it
    os.environ.pop("LAB_DB_URL", None)
    from runner import api
    from runner.service.launch import stop_group
    from storage.db import get_engine

    engine = get_engine()
    if args.report:
        runs = api.list_runs(engine, api.RunFilter(tag=["converge"]), limit=200)
        tags = sorted({t for ts in runs["tags"] for t in ts if t != "converge"})[-2:]
        print(report(engine, (tags[0], tags[1]), Path(args.out)))
        return
    api.ensure_runner()
    if not api.wait_for_runner(engine):
        raise SystemExit(f"no runner came up; see {home}/runner.log")
    try:
        tags = (check(engine, cfg["steps"], "float32", cfg["eval_every"], 3600),
                check(engine, cfg["bf16_steps"], "bf16-mixed", cfg["eval_every"], 3600))  # fmt: skip
    finally:
        status = api.runner_status(engine)
        if status:
            stop_group(status["pid"], 10.0)
    print(report(engine, tags, Path(args.out)))
    print(f"(runs kept in {home}; --report {home} writes the section again)")


if __name__ == "__main__":
    main()
