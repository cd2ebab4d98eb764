"""`python -m runner plan` and `python -m runner calibrate`: parsers and what they run.

runner/__main__.py wires them: `add_plan_parser(sub)` / `add_calibrate_parser(sub)` add the subcommands,
and `run_plan(args)` / `run_calibrate(args)` run them (exit status). The plan is a ranked table of the
feasible layouts with predicted memory per device and step time, then the infeasible ones with their
reasons; `--json` prints `Plan.to_dict()` for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from runner.gpt.config import FAMILIES, describe_model
from runner.planner.devices import KINDS, Devices, described, efficiency_on, from_partition, preset
from runner.planner.inputs import (
    DEFAULT_SEQ,
    MICROBATCH_SIZE_HELP,
    MICROBATCHES_HELP,
    default_seq,
    input_problems,
    zero_stages,
)
from runner.planner.layouts import (
    DEFAULT_ZERO_STAGES,
    STEP_NOTE,
    Plan,
    plan,
    usable_note,
    uses_every_device_by_default,
)
from runner.planner.models import MODELS, GiB, Workload, with_dims
from runner.planner.what_fits import what_fits, what_fits_text
from runner.spec.run_spec import DTYPE_KEEPS, DTYPES, MODEL_FIELDS, SCHEDULES, WORKLOADS, SpecError, SpecProblem

DEFAULT_GPU = "h100-80gb"
DESCRIBED_PER_NODE = 8  # described devices without --gpus-per-node: a DGX-style node


def add_plan_parser(sub: Any) -> argparse.ArgumentParser:
    """The `plan` subcommand on an argparse subparsers object."""
    p = sub.add_parser("plan", help="which tp x pp x dp (x ZeRO) layout for a model on these devices")
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS), help="a preset (dimensions below override)")
    for dim in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "n_kv_head", "ffn_hidden"):
        p.add_argument(f"--{dim.replace('_', '-')}", dest=dim, type=int, default=None)
    p.add_argument("--family", choices=FAMILIES, default=None, help="gpt2 or llama parts (default: the preset's)")
    p.add_argument("--rope-theta", type=float, default=None, help="rotary base (llama)")
    p.add_argument("--tie-head", action=argparse.BooleanOptionalAction, default=None,
                   help="the LM head shares the token embedding (default: the preset's)")  # fmt: skip
    p.add_argument("--workload", default="train", choices=WORKLOADS)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences, all replicas)")
    p.add_argument(
        "--seq", type=int, default=None, help=f"sequence length (default: the model's block_size, at most {DEFAULT_SEQ:,}, as the Planner page)"
    )
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="bf16-mixed", choices=DTYPES,
                   help="; ".join(f"{d}: {DTYPE_KEEPS[d]}" for d in DTYPES).replace("%", "%%"))
    p.add_argument("--reduce-fp32", action="store_true", help="bfloat16, bf16-master: gradients reduced in float32")
    p.add_argument("--checkpoint", default="none", help="none, blocks or every-K")
    p.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    p.add_argument("--microbatches", type=int, default=0, help=MICROBATCHES_HELP)
    p.add_argument("--microbatch-size", type=int, default=0, help=MICROBATCH_SIZE_HELP)
    p.add_argument("--virtual-stages", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--zero", default=",".join(map(str, DEFAULT_ZERO_STAGES)),
                   help="ZeRO stages to consider, e.g. 1 or 0,1,3 (applied where dp > 1; default 0,1 as on the page)")
    p.add_argument("--efficiency", type=float, default=None,
                   help="a flat share of peak FLOP/s for every matmul (default: modelled from the shapes and the GPU)")
    dev = p.add_argument_group("devices: a known GPU (--gpu), this host (--this-host), a Slurm partition, or described")
    dev.add_argument("--gpus", type=int, default=8, help="device count")
    dev.add_argument("--gpu", default=None, choices=sorted(KINDS), help="a known GPU kind")
    dev.add_argument("--gpus-per-node", type=int, default=None)
    dev.add_argument("--this-host", action="store_true", help="this host's GPUs (NVML), else its calibrated CPU")
    dev.add_argument("--partition", default=None, help="a Slurm partition (sinfo); with --gpu for the GPU kind")
    dev.add_argument("--memory-gib", type=float, default=None, help="described: memory per device")
    dev.add_argument("--tflops", type=float, default=None, help="described: bf16 peak TFLOP/s per device")
    dev.add_argument("--bw-intra", type=float, default=None, help="described: GB/s per device within a node")
    dev.add_argument("--bw-inter", type=float, default=None, help="described: GB/s per device between nodes")
    p.add_argument("--top", type=int, default=15, help="rows of each table (--json prints all)")
    fewer = p.add_mutually_exclusive_group()  # neither: the page's default (also fewer on up to 8 devices)
    fewer.add_argument("--fewer", action="store_const", const=True, dest="fewer",
                       help="also layouts that leave some devices unused (default on up to 8 devices, as on the page)")
    fewer.add_argument("--every-device", action="store_const", const=False, dest="fewer",
                       help="only layouts that use every device (default above 8 devices)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    return p


def devices_from_args(args: argparse.Namespace) -> Devices:
    """The devices the arguments describe; raises SpecError naming the flag at fault and the fix."""
    if args.this_host:
        from runner import api
        from storage.db import get_engine

        try:
            engine = get_engine()
        except Exception:  # noqa: BLE001 -- no database here: plan from published figures, said in source
            engine = None
        return api.this_host_devices(engine)
    if args.partition:
        from runner.service.cluster import ClusterError, read_partition

        if not args.gpu:
            raise _problem("gpu", "--partition needs --gpu KIND (sinfo does not say which GPU the nodes have)")
        try:
            return from_partition(read_partition(args.partition), args.gpu)
        except (ClusterError, ValueError) as exc:  # sinfo failed or found no GPU nodes: say so, not a traceback
            said = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise _problem("partition", f"{said}. Check the name (sinfo -s lists the partitions) on a host where "
                                        "Slurm answers, or plan these GPUs without it: --gpu KIND --gpus N "
                                        "--gpus-per-node M") from exc  # fmt: skip
    if _described(args):
        missing = [f for f in ("memory_gib", "tflops", "bw_intra", "bw_inter") if getattr(args, f) is None]
        if missing:
            raise SpecError([SpecProblem(m, "devices described by hand need it, with --memory-gib, --tflops, "
                                            "--bw-intra and --bw-inter") for m in missing])  # fmt: skip
        return described(args.gpus, args.memory_gib, args.tflops, args.bw_intra, args.bw_inter,
                         args.gpus_per_node or min(args.gpus, DESCRIBED_PER_NODE))  # fmt: skip
    return preset(args.gpu or DEFAULT_GPU, args.gpus, args.gpus_per_node)


def _usual_per_node(args: argparse.Namespace) -> int | None:
    """GPUs a node of the devices asked when --gpus-per-node is not given: the kind's usual node (described: 8);
    None for this host and a partition, whose nodes are what they are."""
    if args.this_host or args.partition:
        return None
    return DESCRIBED_PER_NODE if _described(args) else KINDS[args.gpu or DEFAULT_GPU].gpus_per_node


def _described(args: argparse.Namespace) -> bool:
    return args.memory_gib is not None or args.tflops is not None


def _problem(field: str, message: str) -> SpecError:
    return SpecError([SpecProblem(field, message)])


def workload_from_args(args: argparse.Namespace, block_size: int) -> Workload:
    """The workload asked; seq defaults to `default_seq` (the page's default too), or 1 when block_size is
    itself wrong (below 1: its own problem, not one of a --seq the user never gave)."""
    seq = args.seq if args.seq is not None else default_seq(block_size)
    return Workload.of(args, seq=seq)


def compute_basis(devices: Devices, efficiency: float | None) -> str:
    """How the plan times compute, in words: at the rate this host's calibration measured, at a flat share of peak,
    by each matmul's shape on the kind, or at the kind's achievable share of its peak (no SM count to tile with)."""
    if devices.measured_rate:
        return "compute at the matmul rate one rank measured (calibrated)"
    if efficiency is not None:
        return f"compute at {efficiency:.0%} of peak"
    if devices.sms > 0:
        return "matmuls timed by shape on this GPU kind"
    what = "assumed rate" if devices.is_cpu else "peak"
    return f"matmuls at {devices.matmul_share:.0%} of the {devices.word}'s {what}"


def format_plan(result: Plan, top: int = 15) -> str:
    """The ranked table and the infeasible list, as plain text (memory per GPU, or per device on CPU ranks)."""
    dev = result.devices
    biggest = max((c.memory.total for c in result.feasible + result.infeasible if c.memory), default=0)
    unit, div = ("GiB", GiB) if biggest >= GiB else ("MiB", 2**20)
    lines = [
        f"{dev.describe()} [{dev.source}]",
        f"model: {describe_model(result.model)}",  # its head and rotary base too: a custom llama keeps gpt2's tie
        f"{result.work.workload} batch {result.work.batch} x seq {result.work.seq}, {result.work.dtype}, "
        f"checkpoint {result.work.checkpoint}, {result.work.schedule}; {compute_basis(dev, result.efficiency)}",
        "",
        f"{'layout':<22}{'mb':>5}{f'{unit}/{dev.word}':>11}{'params':>9}{'grads':>8}{'optim':>8}{'adamw':>8}"
        f"{'activ':>8}{'other':>8}{'step s':>9}{'bubble':>8}{'comm s':>9}",
    ]
    for c in result.feasible[:top]:
        m, s = c.memory, c.step
        assert m is not None and s is not None
        comm = s.tp_comm_s + s.pp_comm_s + s.dp_comm_s
        lines.append(
            f"{c.layout.label():<22}{c.microbatches:>5}{m.total / div:>11.1f}{m.param_bytes / div:>9.1f}"
            f"{m.grad_bytes / div:>8.1f}{m.optimizer_bytes / div:>8.1f}{m.optimizer_step_bytes / div:>8.1f}"
            f"{m.activation_bytes / div:>8.1f}{(m.kv_cache_bytes + m.transient_bytes) / div:>8.1f}"
            f"{s.total:>9.3g}{s.bubble_fraction:>8.1%}{comm:>9.3g}"
        )
    if len(result.feasible) > top:
        lines.append(f"... {len(result.feasible) - top} more feasible (--top N or --json)")
    if not result.feasible:
        lines.append("(no layout fits)")
    if result.feasible and result.feasible[0].memory:
        lines.append(f"{unit}/{dev.word}: the most a rank holds at one moment, not the sum of the columns (each part's "
                     f"largest; gradients and temporaries come and go); the first row peaks at: {result.feasible[0].memory.peak_at}")  # fmt: skip
        if result.feasible[0].memory.notes:
            lines.append("the first row's memory: " + "; ".join(result.feasible[0].memory.notes))
    if result.work.workload == "train":
        lines.append(f"adamw: {STEP_NOTE}")
    lines += ["", f"infeasible ({len(result.infeasible)}):"] + ([f"  ({usable_note(dev)})"] if result.infeasible else [])
    for c in result.infeasible[:top]:
        lines.append(f"  {c.layout.label():<22}{'; '.join(c.reasons)}")
    if len(result.infeasible) > top:
        lines.append(f"  ... {len(result.infeasible) - top} more")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; 2 on bad arguments (every problem named by its flag, nothing planned)."""
    given = {d: getattr(args, d) for d in MODEL_FIELDS if hasattr(args, d)}
    cfg = with_dims(MODELS[args.model], **given)
    work = workload_from_args(args, cfg.block_size)
    problems = input_problems(
        cfg, work, parts=given, zero=str(args.zero), efficiency=args.efficiency, gpus=args.gpus,
        gpus_per_node=args.gpus_per_node, usual_per_node=_usual_per_node(args), memory_gib=args.memory_gib,
        tflops=args.tflops, bw_intra=args.bw_intra, bw_inter=args.bw_inter, top=args.top,
    )  # fmt: skip
    if not problems:
        try:
            devices = devices_from_args(args)
        except SpecError as exc:
            problems += exc.problems
        except ValueError as exc:
            problems.append(SpecProblem("devices", str(exc)))
        else:
            if devices.measured_rate and args.efficiency not in (None, 1.0):
                problems.append(SpecProblem("efficiency", "this host's CPU ranks compute at the matmul rate its "
                                            "calibration measured, a share of 1 (a share of a published peak is for "
                                            "GPUs): leave --efficiency out"))  # fmt: skip
    if problems:
        if args.json:
            print(json.dumps({"error": "invalid plan inputs", "problems": [
                {"field": p.field, "flag": _flag(p.field), "message": p.message} for p in problems]}))  # fmt: skip
        for p in problems:
            print(f"plan: {_flag(p.field)}: {p.message}", file=sys.stderr)
        return 2
    zero, _ = zero_stages(str(args.zero))
    efficiency = efficiency_on(devices, args.efficiency)
    use_all = uses_every_device_by_default(devices.count) if args.fewer is None else not args.fewer
    result = plan(cfg, work, devices, zero_stages=zero, efficiency=efficiency, use_all=use_all)
    found = what_fits(cfg, work, devices, zero, efficiency, use_all) if not result.feasible else []
    if args.json:
        out = result.to_dict()
        if not result.feasible:
            out["what_fits"] = [{"change": words, **c.to_dict()} for words, c in found]
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(result, args.top))
        if not result.feasible:
            print("\n" + what_fits_text(found, devices.word))
    return 0


def _flag(field: str) -> str:
    """The plan flag of an input field ('devices' is several flags: the message names them)."""
    return field if field == "devices" else "--" + field.replace("_", "-")


def add_calibrate_parser(sub: Any) -> argparse.ArgumentParser:
    """The `calibrate` subcommand: measure this host's matmul rate and all-reduce bandwidth and store them."""
    p = sub.add_parser("calibrate", help="measure this host's matmul rate and link bandwidth for the planner")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--size", type=int, default=1024, help="matmul size n (n x n times n x n)")
    p.add_argument("--mib", type=int, default=16, help="all-reduce payload in MiB (on GPUs at least 256)")
    p.add_argument("--no-store", action="store_true", help="print only, do not store in the database")
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    from runner.planner.calibrate import calibrate_and_store

    try:
        cal = calibrate_and_store(device=args.device, size=args.size, mib=args.mib, store=not args.no_store)
    except RuntimeError as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 1
    print(cal.describe())
    return 0
