"""The command line: python -m runner serve|submit|list|show|cancel|logs|compare|export|selftest|converge|plan|
calibrate, each with --json.

Exit codes: 0 success; 1 the run (or command) did not succeed, a verified run failed its verify, or a
self-test row failed; 2 bad input (nothing queued); 3 another runner already serves this host on the database.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from runner import api
from runner.service.launchers import add_serve_arguments, launcher_from_args
from runner.spec.cli_flags import add_spec_arguments, specs_from_args
from runner.spec.records import RunStatus
from runner.spec.run_spec import (
    DEVICES,
    WORKLOADS,
    SpecError,
    model_label,
)
from runner.spec.strategies import strategy_names
from storage.db import get_engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runner", description="Parallel GPT Lab runner and CLI")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="the runner loop (one per host and database)")
    serve.add_argument("--max-cpu-jobs", type=int, default=1, help="CPU jobs that may run at once (default 1)")
    serve.add_argument("--host", help="this machine's name in a team database (default: LAB_HOST, else the host name)")
    serve.add_argument("--share-gpus", action="store_true", default=None,
                       help="also book GPUs where other users' processes run (default: LAB_SHARE_GPUS=1, else not: "
                            "such a GPU is shown busy and runs wait for it)")  # fmt: skip
    add_serve_arguments(serve)  # --backend local|slurm and the cluster's partition, account, nodes

    submit = sub.add_parser("submit", help="validate and queue a run")
    add_spec_arguments(submit)  # one flag per spec field, the registry's choices and help
    submit.add_argument("--tag", action="append", dest="tags", help="a tag (repeatable)")
    submit.add_argument("--user", help="who launched it (default: the OS user)")
    submit.add_argument("--spec-json", action="append", help="a whole spec as JSON (flags override its fields); "
                        "give it again for more specs, queued as one comparison set")  # fmt: skip
    submit.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="queue K runs of each spec as one comparison set, run one at a time interleaved (A B A B "
                        "...) so each spec meets the same machine; `compare` then gives medians with intervals: 6 runs "
                        "give a 95%% interval of a median, 4 of each can resolve a difference between two specs")  # fmt: skip
    submit.add_argument(
        "--host",
        dest="run_on",
        metavar="HOST|any",
        help="the host whose runner runs it (default: this machine), or 'any' host with the devices",
    )
    submit.add_argument("--wait", action="store_true", help="start a runner if needed and wait for the run to end")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")

    listing = sub.add_parser("list", help="runs, newest first")
    listing.add_argument("--limit", type=at_least(1), default=20, help="runs to list (default 20)")
    listing.add_argument("--offset", type=at_least(0), default=0, help="newest runs to skip first (default 0)")
    add_filters(listing)
    sub.add_parser("show", help="one run").add_argument("id", type=int)
    sub.add_parser("cancel", help="cancel a queued or running run").add_argument("id", type=int)
    logs = sub.add_parser("logs", help="a rank's log")
    logs.add_argument("id", type=int)
    logs.add_argument("--rank", type=int, default=0)
    logs.add_argument("--follow", action="store_true")
    selftest = sub.add_parser(
        "selftest", help="every strategy x workload the devices allow, verified (first command on a new machine)"
    )
    selftest.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA when torch sees a GPU, else CPU"
    )
    selftest.add_argument("--user", help="who launched it (default: the OS user)")
    selftest.add_argument("--timeout", type=float, default=900.0, help="give up on the runs after this many seconds")
    selftest.add_argument("--data", default="synthetic",
                          help="what every run reads: synthetic (default), stdlib (real text, byte-level) or a corpus")  # fmt: skip
    selftest.add_argument("--strategy", dest="strategies", action="append", choices=strategy_names(), default=[],
                          metavar="NAME", help="only this strategy's rows (repeat for more; default: every one)")  # fmt: skip
    selftest.add_argument("--no-options", dest="options", action="store_false",
                          help="the strategies alone: leave out the ZeRO, schedule, checkpointing, bf16-mixed and llama-tiny rows")  # fmt: skip
    compare = sub.add_parser("compare", help="runs grouped by spec: medians with 95%% intervals, and which "
                             "differences the runs resolve (as the Compare page)")  # fmt: skip
    compare.add_argument("ids", type=int, nargs="+", metavar="ID")
    export = sub.add_parser("export", help="every run as CSV or JSON")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    add_filters(export)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="machine-readable output")
    from runner.planner.cli import add_calibrate_parser, add_plan_parser  # torch-free; declares its own --json

    add_plan_parser(sub)
    add_calibrate_parser(sub)
    from runner.analysis.converge import add_converge_parser

    add_converge_parser(sub).add_argument("--json", action="store_true", help="machine-readable output")
    return parser


FILTERS = ("status", "strategy", "model", "workload", "user", "tag")


# The filters whose values are a closed set: a value outside it is refused (exit 2, naming it) instead of
# matching no run, which read as "no runs".
FILTER_CHOICES = {"status": [s.value for s in RunStatus], "strategy": strategy_names(), "workload": list(WORKLOADS)}


def add_filters(parser: argparse.ArgumentParser) -> None:
    """The history page's filters as repeatable flags (any of the values given matches)."""
    for name in FILTERS:
        choices = FILTER_CHOICES.get(name)
        parser.add_argument(f"--{name}", action="append", dest=f"filter_{name}", metavar=name.upper(), choices=choices,
                            help=f"one of {', '.join(choices)}; repeat for any of several" if choices else "repeatable")  # fmt: skip


def at_least(low: int):
    """An argparse type: a whole number no less than `low` (argparse names the flag in its refusal)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value

    return parse


def runs_text(df) -> str:
    """`list` as people read it: one short line a run, the History table's figures, verify as a verdict."""
    from ui.verify import list_verdict

    if not len(df):
        return "no runs"
    rows = [("id", "status", "strategy", "layout", "model", "workload", "tokens/s", "step p50", "verify", "created")]
    for r in df.to_dict("records"):
        tokens = r["tokens_per_s"]
        step = r["step_time_s_p50"]
        rows.append((str(r["id"]), r["status"], r["strategy"], f"tp{r['tp']} pp{r['pp']} dp{r['dp']}",
                     model_label(r["model"], r.get("weights")), r["workload"],
                     (f"{tokens:,.0f}" if tokens >= 100 else f"{tokens:.3g}") if tokens == tokens and tokens else "—",
                     f"{step * 1e3:.3g} ms" if step == step and step else "—",
                     list_verdict(r.get("verify"), r["status"]), str(r["created_at"])[:16]))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def filters_from(args: argparse.Namespace) -> api.RunFilter:
    return api.RunFilter(**{name: getattr(args, f"filter_{name}") for name in FILTERS})


def emit(args: argparse.Namespace, obj, text: str) -> None:
    print(json.dumps(obj, indent=1, default=str) if args.json else text)


def run_summary(run: dict) -> str:
    r = run.get("result") or {}
    parts = [
        f"run {run['id']}: {run['status']}",
        f"{run['spec']['strategy']} {model_label(run['spec']['model'], run['spec'].get('weights'))} "
        f"{run['spec']['workload']}",
    ]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} tokens/s, step p50 {r['step_time_s_p50'] * 1000:.1f} ms")
    if r.get("loss") is not None and run["spec"].get("workload", "train") == "train":
        parts.append(f"final loss {r['loss']:.4f}")
    if r.get("verify"):  # asked for with --verify: its verdict, as the run's page shows it
        from ui.verify import verdict

        parts.append(f"verify {verdict(r['verify']).upper()}")
    if run.get("error"):
        parts.append(run["error"])
    return " | ".join(parts)


def cmd_submit(args: argparse.Namespace) -> int:
    engine = get_engine()
    run_on = api.ANY_HOST if args.run_on == "any" else args.run_on or None
    elsewhere = run_on not in (None, api.ANY_HOST, api.this_host())
    if args.strategy is None and not args.spec_json:
        print("submit: --strategy is required (or a --spec-json that names it)", file=sys.stderr)
        return 2
    try:
        specs = specs_from_args(args)
        as_set = len(specs) > 1 or args.repeat != 1
        if as_set:
            ids = api.submit_set(engine, specs, args.repeat, user=args.user, run_on=run_on)
        else:
            ids = [api.submit(engine, specs[0], user=args.user, run_on=run_on)]
    except SpecError as exc:
        problems = exc.problems
        if args.json:
            print(json.dumps({"error": "invalid spec", "problems": [
                {"field": p.field, "message": p.message} for p in problems]}))  # fmt: skip
        else:
            print("refused, nothing queued:", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
        return 2
    target = api.get_run(engine, ids[0])["target_host"]
    if not args.wait:
        where = f" on {target}" if target else " for any host with the devices"
        if elsewhere and not any(h["alive"] and h["host"] == target for h in api.hosts(engine)):
            where += f" (no runner is alive on {target} now: it waits for one)"
        if as_set:
            emit(args, {"ids": ids, "set_id": ids[0], "status": "queued", "target_host": target},
                 f"queued comparison set {ids[0]}: runs {', '.join(map(str, ids))}{where}, run one at a time in "
                 f"turn; then: python -m runner compare {' '.join(map(str, ids))}")  # fmt: skip
        else:
            emit(args, {"id": ids[0], "status": "queued", "target_host": target}, f"queued run {ids[0]}{where}")
        return 0
    if not elsewhere:  # another host's runner is that host's business: only this machine's is started here
        api.ensure_runner()
        if not api.wait_for_runner(engine):
            print("no runner came up within 30 s; see LAB_HOME/runner.log", file=sys.stderr)
            return 1
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last_check = time.monotonic()
    while True:
        runs = [api.get_run(engine, i) for i in ids]
        if all(api.is_terminal(run["status"]) for run in runs):
            break
        if time.monotonic() - last_check > 5 and not elsewhere:
            api.ensure_runner()  # the runner died while we waited: start another (it adopts the live job)
            last_check = time.monotonic()
        if deadline and time.monotonic() > deadline:
            waiting = [run for run in runs if not api.is_terminal(run["status"])]
            emit(args, runs if as_set else runs[0], "; ".join(
                f"run {run['id']} still {run['status']} after {args.timeout:g} s" for run in waiting))  # fmt: skip
            return 1
        time.sleep(0.3)
    emit(args, runs if as_set else runs[0], "\n".join(run_summary(run) for run in runs))
    code = 0
    for run in runs:
        verify = (run.get("result") or {}).get("verify")
        if run["status"] != "succeeded":
            code = 1
        elif verify and verify.get("passed") is not True:
            if not args.json:
                print(f"run {run['id']}: verify FAILED: " + "; ".join(verify.get("failures") or ["no verdict"]),
                      file=sys.stderr)  # fmt: skip
            code = 1
    return code


def cmd_selftest(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from runner import selftest

    # The data every row reads is judged once, up front: a path that is not there refused each row on its own,
    # printed as bare SKIP rows and "0 of 9 passed" (exit 1) instead of bad input naming the field (exit 2).
    from runner.spec.run_spec import RunSpec
    from runner.spec.validation import validate_spec

    if problems := [p for p in validate_spec(RunSpec(data=args.data)) if p.field == "data"]:
        if args.json:
            print(json.dumps({"error": "invalid selftest input", "problems": [
                {"field": p.field, "message": p.message} for p in problems]}))  # fmt: skip
        for p in problems:
            print(f"selftest: --data: {p.message}", file=sys.stderr)
        return 2
    engine = get_engine()
    if not args.json:
        print("Parallel GPT Lab self-test")

    def show(row: selftest.Row) -> None:
        if not args.json:
            print(selftest.format_row(row), flush=True)

    env, rows, fatal = selftest.run_selftest(engine, args.device, user=args.user, timeout_s=args.timeout,
                                             on_row=show, on_environment=None if args.json else print,
                                             options=args.options, data=args.data,
                                             strategies=tuple(args.strategies))  # fmt: skip
    passed = fatal is None and all(r.ok for r in rows) and any(r.run_id for r in rows)
    if args.json:
        print(json.dumps({"environment": env, "fatal": fatal, "passed": passed,
                          "rows": [{**asdict(r), "ok": r.ok} for r in rows]}, indent=1, default=str))  # fmt: skip
        return 0 if passed else 1
    for row in rows:
        if row.run_id is None:
            print(selftest.format_row(row))
    ran = [r for r in rows if r.run_id is not None or r.verdict == "error"]
    failed = [r for r in rows if not r.ok]
    if fatal:
        print(f"FAILED: {fatal}")
    else:
        print(f"{'PASSED' if passed else 'FAILED'}: {len(ran) - len(failed)} of {len(ran)} runs passed verify"
              + (f", {len(rows) - len(ran)} skipped" if len(rows) > len(ran) else "")
              + "; runs are in History under the tag 'selftest'")  # fmt: skip
    return 0 if passed else 1


def cmd_compare(args: argparse.Namespace) -> int:
    """The Compare page's medians, intervals and verdicts for the runs named (ui/compare_sets.py)."""
    from ui.compare_sets import comparison, comparison_text

    engine = get_engine()
    runs, missing = [], []
    for run_id in dict.fromkeys(args.ids):
        run = api.get_run(engine, run_id)
        (runs.append(run) if run else missing.append(run_id))
    if missing:
        emit(args, {"error": f"no run {', '.join(map(str, missing))}"}, f"no run {', '.join(map(str, missing))}")
        return 1
    if not any(r.get("result") for r in runs):
        emit(args, {"error": "none of these runs has a result yet"}, "none of these runs has a result yet")
        return 1
    emit(args, comparison(runs), comparison_text(runs))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """A rank's log from its run folder when this machine ran it, else the tail its host's runner stored in the
    database (a teammate's run on another host); --follow streams what either gains until the run ends."""
    engine = get_engine()
    run = api.get_run(engine, args.id)
    if run is None:
        print(f"no run {args.id}", file=sys.stderr)
        return 1
    log = api.log(engine, run, f"rank{args.rank}")
    host = run["runner_host"] or run["target_host"] or "another host"
    if log.text is None:
        if not run["run_dir"] and run["status"] == "queued":
            print(f"run {args.id} has not started yet ({run['status']})", file=sys.stderr)
        else:
            print(f"no log for rank {args.rank}: not in this machine's run folder and {host} stored none",
                  file=sys.stderr)  # fmt: skip
        return 1
    if args.json:  # the log as it is now (--follow streams text only)
        out = {"id": args.id, "rank": args.rank, "path": log.path, "status": run["status"], "text": log.text}
        if log.source == "database":
            out.update(source="database", host=host, size=log.size)
        print(json.dumps(out))
        return 0
    if log.cut:
        print(f"[run {args.id} ran on {host}: the last {len(log.text.encode())} of {log.size} bytes, "
              "as its runner stored them]", file=sys.stderr)  # fmt: skip
    sys.stdout.write(log.text)
    sys.stdout.flush()
    if args.follow:
        for chunk in api.follow(engine, run, log):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        import os

        from runner.service.loop import Runner

        if args.host:
            os.environ["LAB_HOST"] = args.host  # one lease per host name; its jobs inherit it too
        try:
            launcher = launcher_from_args(args)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        return Runner(get_engine(), max_cpu_jobs=args.max_cpu_jobs, launcher=launcher,
                      share_gpus=args.share_gpus).serve()  # fmt: skip
    if args.command == "submit":
        return cmd_submit(args)
    if args.command == "logs":
        return cmd_logs(args)
    if args.command == "compare":
        return cmd_compare(args)
    if args.command == "selftest":
        return cmd_selftest(args)
    if args.command == "converge":
        from runner.analysis.converge import run_converge

        return run_converge(args)
    if args.command in ("plan", "calibrate"):
        from runner.planner.cli import run_calibrate, run_plan

        return run_plan(args) if args.command == "plan" else run_calibrate(args)
    engine = get_engine()
    if args.command == "list":
        df = api.list_runs(engine, filters_from(args), limit=args.limit, offset=args.offset)
        emit(
            args,
            json.loads(df.to_json(orient="records", date_format="iso")),
            runs_text(df),
        )
        return 0
    if args.command in ("show", "cancel"):
        run = api.get_run(engine, args.id)
        if run is None:
            emit(args, {"error": f"no run {args.id}"}, f"no run {args.id}")
            return 1
        if args.command == "show":
            emit(args, run, run_summary(run))
            return 0
        status = api.cancel(engine, args.id)
        done = status in ("cancelled", "cancelling")
        text = f"run {args.id}: {status}" + ("" if done else " already; nothing to cancel")
        emit(args, {"id": args.id, "status": status}, text)
        return 0 if done else 1
    if args.command == "export":
        if args.format == "csv":
            for chunk in api.export_csv(engine, filters_from(args)):
                sys.stdout.write(chunk)
        else:
            print(json.dumps(api.export_runs(engine, filters_from(args)), indent=1, default=str))
        return 0
    return 2


def run_main() -> int:
    """main, quiet when the reader of its output goes away first (`... export | head`): as Python's signal docs
    advise, stdout is pointed at devnull so the interpreter's final flush does not fail again."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run_main())
