"""`python -m runner converge`: do the strategies train as a single device does, step after step?

It queues the convergence check through runner.api.submit_converge (runner/spec/converge_layouts.py: the chosen
strategies, default every one, at their smallest layouts on the same data, seed and model, under one new tag),
starts this machine's runner if none serves it, waits for the runs, then prints per strategy its first and last
loss, its last held-out loss and the largest relative deviation of its loss curve from the single-device
run's (runner/job/metrics.py curve_deviation), with a verdict against the dtype's bound; every run also verifies
its first step against the single-device reference, and a failed verify fails its row. The runs stay in
History under the tag, and Compare overlays their curves (the tag's link is printed). Exit status 0 when every
curve is within its bound, 1 otherwise, 2 for a spec the check refuses (nothing queued).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from runner import api
from runner.job.metrics import step_number
from runner.spec.converge_layouts import BASELINE, DEFAULTS, bound_of, bound_text, judge
from runner.spec.run_spec import DEVICES, DTYPES, SpecError

SETTINGS = ("steps", "data", "model", "dtype", "seed", "batch", "seq", "lr", "eval_every")


@dataclass
class Row:
    """One strategy's curve against the single-device run's."""

    label: str
    run_id: int | None
    status: str = "skipped"
    steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    last_eval_loss: float | None = None
    early_deviation: float | None = None  # over the dtype's early window (converge_layouts.Bound.early_steps)
    largest_deviation: float | None = None
    at_step: int | None = None
    verdict: str = "skipped"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.verdict in ("pass", "baseline", "skipped")


def add_converge_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("converge", help="every strategy's loss curve against a single device's, on real text")
    p.add_argument("--strategies", help="comma-separated (default: every strategy); single is always the baseline")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when the runner sees GPUs")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"training steps (default {DEFAULTS.steps})")
    p.add_argument("--data", default=DEFAULTS.data, help="stdlib (default), a text folder or file, a nanoGPT folder")
    p.add_argument("--model", default=DEFAULTS.model)
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--batch", type=int, default=DEFAULTS.batch)
    p.add_argument("--seq", type=int, default=DEFAULTS.seq)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--eval-every", dest="eval_every", type=int, default=DEFAULTS.eval_every)
    p.add_argument("--user", help="who launched it (default: the OS user)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on the runs after this many seconds")
    return p


def collect(engine, queued: list[tuple[str, int | None]], dtype: str) -> list[Row]:
    """Each run's curve read back and judged against the single-device run's (queued[0])."""
    ids = [i for _, i in queued if i is not None]
    curves = api.loss_curves(engine, ids)
    by_run = {int(k): g for k, g in curves.groupby("run_id")} if len(curves) else {}

    def series(run_id: int | None, column: str) -> dict[int, float | None]:
        g = by_run.get(run_id) if run_id is not None else None
        if g is None:
            return {}
        return {int(s): (None if pd.isna(v) else float(v)) for s, v in zip(g["step"], g[column], strict=True)}

    base = series(queued[0][1], "loss")
    rows = []
    for label, run_id in queued:
        if run_id is None:
            rows.append(Row(label, None))
            continue
        run = api.get_run(engine, run_id)
        row = Row(label, run_id, status=run["status"])
        losses = [v for v in series(run_id, "loss").values() if v is not None]
        evals = [v for v in series(run_id, "eval_loss").values() if v is not None]
        row.steps = len(losses)
        row.first_loss, row.last_loss = (losses[0], losses[-1]) if losses else (None, None)
        row.last_eval_loss = evals[-1] if evals else None
        verify = (run.get("result") or {}).get("verify") or {}
        if run["status"] != "succeeded":
            row.verdict, row.error = "error", run.get("error") or f"run ended {run['status']}"
        elif verify.get("passed") is False:
            row.verdict, row.error = "fail", "verify: " + "; ".join(verify.get("failures") or ["no verdict"])
        elif label.split()[0] == BASELINE:
            row.verdict, row.early_deviation, row.largest_deviation = "baseline", 0.0, 0.0
        else:
            j = judge(base, series(run_id, "loss"), dtype)
            row.early_deviation = j.early_judged if j.early.steps else None
            row.largest_deviation = j.whole.largest if j.whole.steps else None
            row.at_step = j.whole.at_step
            row.verdict = j.verdict if j.whole.steps == len(base) else "no curve"
        rows.append(row)
    return rows


def wait(engine, ids: list[int], timeout_s: float) -> None:
    """Until every run has ended; runs still going at the deadline are cancelled."""
    deadline = time.monotonic() + timeout_s
    for run_id in ids:
        while not api.is_terminal(api.get_run(engine, run_id)["status"]):
            if time.monotonic() > deadline:
                api.cancel(engine, run_id)
                break
            time.sleep(0.5)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else format(x, fmt))


def format_row(row: Row) -> str:
    if row.run_id is None:
        return f"SKIP  {row.label}"
    line = (f"{row.verdict.upper():8} run {row.run_id:<5} {row.label:28} loss {_num(row.first_loss, '.4f')} -> "
            f"{_num(row.last_loss, '.4f')} in {row.steps} steps  held-out {_num(row.last_eval_loss, '.4f')}  "
            f"deviation {_num(row.early_deviation, '.1e')} early, "
            f"largest {_num(row.largest_deviation, '.1e')}"
            + (f" at step {step_number(row.at_step)}" if row.at_step is not None else ""))  # fmt: skip
    return line + (f"\n      {row.error}" if row.error else "")


def run_converge(args: argparse.Namespace) -> int:
    from storage.db import get_engine

    engine = get_engine()
    settings = {k: getattr(args, k) for k in SETTINGS}
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None
    try:
        tag, queued = api.submit_converge(engine, strategies, args.device, user=args.user, settings=settings)
    except SpecError as exc:
        print("refused, nothing queued:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    ids = [i for _, i in queued if i is not None]
    if not args.json:
        print(f"queued {len(ids)} runs under the tag {tag}: {args.steps} steps of {args.model} on {args.data}, "
              f"seed {args.seed}, {args.dtype}", flush=True)  # fmt: skip
    api.ensure_runner()
    if not api.wait_for_runner(engine):
        print("no runner came up within 30 s; see LAB_HOME/runner.log", file=sys.stderr)
        return 1
    wait(engine, ids, args.timeout)
    rows = collect(engine, queued, args.dtype)
    passed = all(r.ok for r in rows) and any(r.verdict == "pass" or r.verdict == "baseline" for r in rows)
    if args.json:
        print(json.dumps({"tag": tag, "bound": asdict(bound_of(args.dtype)), "passed": passed,
                          "rows": [asdict(r) for r in rows]}, indent=1))  # fmt: skip
        return 0 if passed else 1
    for row in rows:
        print(format_row(row))
    print(f"{'PASSED' if passed else 'FAILED'}: the bound of {bound_text(args.dtype)}")
    print(f"History: /history?tag={tag}   Compare: /compare?runs={','.join(map(str, ids))}")
    return 0 if passed else 1
