"""The command line: python -m runner serve|submit|list|show|cancel|logs|export|selftest, each with --json.

Exit codes: 0 success; 1 the run (or command) did not succeed, a verified run failed its verify, or a
self-test row failed; 2 bad input (nothing queued); 3 another runner already serves this host on the database.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from runner import api
from runner.service.launchers import add_serve_arguments, launcher_from_args
from runner.spec.run_spec import (
    DEVICES,
    DTYPES,
    SCHEDULES,
    TP_STYLES,
    WORKLOADS,
    ZERO_STAGES,
    RunSpec,
    SpecError,
    SpecProblem,
    microbatches_of_size,
)
from runner.spec.strategies import get_strategy, strategy_names, users_of
from storage.db import get_engine

SPEC_FLAGS = {  # strategy choices and what uses a degree or option come from the registry (registry_opts)
    "strategy": dict(required=True),
    "tp": dict(type=int),
    "pp": dict(type=int),
    "dp": dict(type=int),
    "microbatches": dict(type=int),
    "schedule": dict(choices=SCHEDULES),
    "virtual_stages": dict(type=int),
    "tp_style": dict(choices=TP_STYLES),
    "sequence_parallel": dict(action="store_true", default=None),
    "zero_stage": dict(type=int, choices=ZERO_STAGES),
    "checkpoint": dict(help="activation checkpointing: none, blocks, or every-K (every K-th block), train only"),
    "model": dict(),
    "n_layer": dict(type=int),
    "n_head": dict(type=int),
    "n_embd": dict(type=int),
    "vocab_size": dict(type=int),
    "block_size": dict(type=int),
    "workload": dict(choices=WORKLOADS),
    "batch": dict(type=int),
    "seq": dict(type=int),
    "new_tokens": dict(type=int),
    "steps": dict(type=int),
    "warmup": dict(type=int),
    "lr": dict(type=float),
    "device": dict(choices=DEVICES),
    "dtype": dict(choices=DTYPES),
    "reduce_fp32": dict(action="store_true", default=None,
                        help="bf16-master or bfloat16: reduce the gradients over data parallelism in float32"),
    "seed": dict(type=int),
    "verify": dict(action="store_true", default=None),
    "weights": dict(),
    "time_limit_s": dict(type=float, flag="--time-limit"),
    "nodes": dict(type=int, help="Slurm: nodes the run spreads over (nodes x GPUs per node = ranks)"),
}


def registry_opts(name: str) -> dict:
    """What the strategy registry says about a spec flag: --strategy's choices with each one's help, and for
    a degree or option the strategies that use it."""
    if name == "strategy":
        names = strategy_names()
        text = "; ".join(f"{n}: {get_strategy(n).help}" for n in names)
        return dict(choices=names, help=text.replace("%", "%%"))
    users = users_of(name)
    return dict(help=f"used by {', '.join(users)}") if users else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runner", description="Parallel GPT Lab runner and CLI")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="the runner loop (one per host and database)")
    serve.add_argument("--max-cpu-jobs", type=int, default=1, help="CPU jobs that may run at once (default 1)")
    serve.add_argument("--host", help="this machine's name in a team database (default: LAB_HOST, else the host name)")
    add_serve_arguments(serve)  # --backend local|slurm and the cluster's partition, account, nodes

    submit = sub.add_parser("submit", help="validate and queue a run")
    for name, opts in SPEC_FLAGS.items():
        opts = {**opts, **registry_opts(name)}
        flag = opts.pop("flag", "--" + name.replace("_", "-"))
        submit.add_argument(flag, dest=name, **opts)
    submit.add_argument("--microbatch-size", type=int, dest="microbatch_size",
                        help="sequences per microbatch (Megatron's --micro-batch-size), instead of --microbatches")
    submit.add_argument("--tag", action="append", dest="tags", help="a tag (repeatable)")
    submit.add_argument("--user", help="who launched it (default: the OS user)")
    submit.add_argument("--spec-json", help="a whole spec as JSON (flags override its fields)")
    submit.add_argument(
        "--host",
        dest="run_on",
        metavar="HOST|any",
        help="the host whose runner runs it (default: this machine), or 'any' host with the devices",
    )
    submit.add_argument("--wait", action="store_true", help="start a runner if needed and wait for the run to end")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")

    listing = sub.add_parser("list", help="runs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--offset", type=int, default=0)
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
    selftest.add_argument("--no-options", dest="options", action="store_false",
                          help="the strategies alone: leave out the ZeRO, schedule, checkpointing and bf16-mixed rows")  # fmt: skip
    export = sub.add_parser("export", help="every run as CSV or JSON")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    add_filters(export)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="machine-readable output")
    from runner.planner.cli import add_calibrate_parser, add_plan_parser  # torch-free; declares its own --json

    add_plan_parser(sub)
    add_calibrate_parser(sub)
    return parser


FILTERS = ("status", "strategy", "model", "workload", "user", "tag")


def add_filters(parser: argparse.ArgumentParser) -> None:
    """The history page's filters as repeatable flags (any of the values given matches)."""
    for name in FILTERS:
        parser.add_argument(f"--{name}", action="append", dest=f"filter_{name}", metavar=name.upper())


def filters_from(args: argparse.Namespace) -> api.RunFilter:
    return api.RunFilter(**{name: getattr(args, f"filter_{name}") for name in FILTERS})


def spec_from_args(args: argparse.Namespace) -> dict:
    """The spec's fields from --spec-json with the flags given on top (api.submit parses and validates them)."""
    if args.spec_json:
        RunSpec.from_json(args.spec_json)  # a malformed or non-object document is refused as a spec problem
        data = json.loads(args.spec_json)
    else:
        data = {}
    for name in SPEC_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if args.tags:
        data["tags"] = args.tags
    if args.microbatch_size is not None:
        if args.microbatches is not None:
            raise SpecError([SpecProblem("microbatch_size", "give --microbatches (a count) or --microbatch-size "
                                                            "(sequences each), not both")])  # fmt: skip
        data["microbatches"] = microbatches_of_size(RunSpec.from_dict(data), args.microbatch_size)
    return data


def emit(args: argparse.Namespace, obj, text: str) -> None:
    print(json.dumps(obj, indent=1, default=str) if args.json else text)


def run_summary(run: dict) -> str:
    r = run.get("result") or {}
    parts = [
        f"run {run['id']}: {run['status']}",
        f"{run['spec']['strategy']} {run['spec']['model']} {run['spec']['workload']}",
    ]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} tokens/s, step p50 {r['step_time_s_p50'] * 1000:.1f} ms")
    if run.get("error"):
        parts.append(run["error"])
    return " | ".join(parts)


def cmd_submit(args: argparse.Namespace) -> int:
    engine = get_engine()
    run_on = api.ANY_HOST if args.run_on == "any" else args.run_on or None
    elsewhere = run_on not in (None, api.ANY_HOST, api.this_host())
    try:
        run_id = api.submit(engine, spec_from_args(args), user=args.user, run_on=run_on)
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
    target = api.get_run(engine, run_id)["target_host"]
    if not args.wait:
        where = f" on {target}" if target else " for any host with the devices"
        if elsewhere and not any(h["alive"] and h["host"] == target for h in api.hosts(engine)):
            where += f" (no runner is alive on {target} now: it waits for one)"
        emit(args, {"id": run_id, "status": "queued", "target_host": target}, f"queued run {run_id}{where}")
        return 0
    if not elsewhere:  # another host's runner is that host's business: only this machine's is started here
        api.ensure_runner()
        if not api.wait_for_runner(engine):
            print("no runner came up within 30 s; see LAB_HOME/runner.log", file=sys.stderr)
            return 1
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last_check = time.monotonic()
    while True:
        run = api.get_run(engine, run_id)
        if api.is_terminal(run["status"]):
            break
        if time.monotonic() - last_check > 5 and not elsewhere:
            api.ensure_runner()  # the runner died while we waited: start another (it adopts the live job)
            last_check = time.monotonic()
        if deadline and time.monotonic() > deadline:
            emit(args, run, f"run {run_id} still {run['status']} after {args.timeout:g} s")
            return 1
        time.sleep(0.3)
    emit(args, run, run_summary(run))
    if run["status"] != "succeeded":
        return 1
    verify = (run.get("result") or {}).get("verify")
    if verify and verify.get("passed") is not True:
        if not args.json:
            print("verify FAILED: " + "; ".join(verify.get("failures") or ["no verdict"]), file=sys.stderr)
        return 1
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from runner import selftest

    engine = get_engine()
    if not args.json:
        print("Parallel GPT Lab self-test")

    def show(row: selftest.Row) -> None:
        if not args.json:
            print(selftest.format_row(row), flush=True)

    env, rows, fatal = selftest.run_selftest(engine, args.device, user=args.user, timeout_s=args.timeout,
                                             on_row=show, on_environment=None if args.json else print,
                                             options=args.options)  # fmt: skip
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
        return Runner(get_engine(), max_cpu_jobs=args.max_cpu_jobs, launcher=launcher).serve()
    if args.command == "submit":
        return cmd_submit(args)
    if args.command == "logs":
        return cmd_logs(args)
    if args.command == "selftest":
        return cmd_selftest(args)
    if args.command in ("plan", "calibrate"):
        from runner.planner.cli import run_calibrate, run_plan

        return run_plan(args) if args.command == "plan" else run_calibrate(args)
    engine = get_engine()
    if args.command == "list":
        df = api.list_runs(engine, filters_from(args), limit=args.limit, offset=args.offset)
        emit(
            args,
            json.loads(df.to_json(orient="records", date_format="iso")),
            df.to_string(index=False) if len(df) else "no runs",
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
        emit(args, {"id": args.id, "status": status}, f"run {args.id}: {status}")
        return 0 if status in ("cancelled", "cancelling") else 1
    if args.command == "export":
        if args.format == "csv":
            for chunk in api.export_csv(engine, filters_from(args)):
                sys.stdout.write(chunk)
        else:
            print(json.dumps(api.export_runs(engine, filters_from(args)), indent=1, default=str))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
