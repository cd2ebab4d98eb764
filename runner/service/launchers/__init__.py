"""Where runs are launched: the Launcher interface (base) and its backends, local torchrun and Slurm.

`make_launcher("local")` or `make_launcher("slurm", partition=..., account=...)`; the runner
(runner.service.loop.Runner) takes the object and talks to that interface only.
"""

from __future__ import annotations

import argparse
from typing import Any

from runner.service.launchers.base import BACKENDS, Collected, JobState, Launcher
from runner.service.launchers.local import LocalLauncher


def make_launcher(backend: str = "local", **options: Any) -> Launcher:
    """The launcher for `backend` ("local" | "slurm"); options go to its constructor (slurm: partition, account)."""
    if backend == "local":
        return LocalLauncher(**options)
    if backend == "slurm":
        from runner.service.launchers.slurm import SlurmLauncher

        return SlurmLauncher(**options)
    raise ValueError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """`serve`'s backend options: --backend local|slurm, and for Slurm --partition, --account, --gpus-per-node."""
    serve.add_argument("--backend", choices=BACKENDS, default="local",
                       help="where runs are launched: torchrun on this machine (local, default) or Slurm jobs")  # fmt: skip
    serve.add_argument("--partition", help="Slurm: the partition runs are submitted to (required with --backend slurm)")
    serve.add_argument("--account", help="Slurm: the account runs are charged to")
    serve.add_argument("--gpus-per-node", type=int, default=None,
                       help="Slurm: GPUs a run uses per node (default: the partition's GRES as sinfo reports it; "
                            "0: CPU nodes, gloo)")  # fmt: skip
    serve.add_argument("--nodes", type=int, default=None,
                       help="Slurm: nodes a run takes (default: world size / GPUs per node; one on CPU)")  # fmt: skip


def launcher_from_args(args: argparse.Namespace) -> Launcher:
    """The launcher `serve`'s options ask for; ValueError when Slurm is asked for without a partition."""
    if getattr(args, "backend", "local") != "slurm":
        return LocalLauncher()
    if not args.partition:
        raise ValueError("--backend slurm needs --partition")
    gpus = args.gpus_per_node
    if gpus is None:  # what the Launch page validates against: the partition's GPUs, read with sinfo
        from runner.service.cluster import ClusterError, read_partition

        try:
            gpus = read_partition(args.partition, args.account).gpus_per_node
        except ClusterError as exc:
            print(f"GPUs per node unknown ({exc}); submitting CPU jobs: pass --gpus-per-node to say", flush=True)
            gpus = 0
    return make_launcher("slurm", partition=args.partition, account=args.account, gpus_per_node=gpus,
                         nodes=args.nodes)  # fmt: skip


__all__ = [
    "BACKENDS",
    "Collected",
    "JobState",
    "Launcher",
    "LocalLauncher",
    "add_serve_arguments",
    "launcher_from_args",
    "make_launcher",
]
