"""A local two-node Slurm cluster for trying the Slurm backend: `make slurm-dev` / `make slurm-dev-stop`.

    python -m scripts.slurm_dev start    # start it (or find it running) and print how to use it
    python -m scripts.slurm_dev env      # only the export lines: eval "$(python -m scripts.slurm_dev env)"
    python -m scripts.slurm_dev status   # running or not, node states, jobs
    python -m scripts.slurm_dev stop     # cancel its jobs and stop every daemon

The same cluster the tests use (tests/slurm_cluster.py): munged, slurmctld and two slurmd (nodes n1 and n2
at 127.0.0.1) in partition `lab`, everything under LAB_HOME/slurm-dev (./lab-data/slurm-dev by default) or
--root. The daemons keep running after this command returns; their state (job ids, finished jobs) survives a
stop and start. Needs Debian's slurmctld slurmd slurm-client munge (`make slurm-dev` installs them) and root.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from tests.slurm_cluster import SlurmCluster, missing_binaries


def default_root() -> Path:
    return Path(os.environ.get("LAB_HOME") or "lab-data").expanduser().resolve() / "slurm-dev"


def export_lines(cluster: SlurmCluster) -> str:
    return f"export SLURM_CONF={shlex.quote(str(cluster.conf))}"


def usage(cluster: SlurmCluster) -> str:
    nodes = ", ".join(cluster.nodes)
    return f"""Nodes {nodes} ({cluster.cpus} CPUs each) in partition '{cluster.partition}'; files and logs under {cluster.root}
To use it from a shell:
  {export_lines(cluster)}
  sinfo                                   # both nodes, partition {cluster.partition}
  python -m runner serve --backend slurm --partition {cluster.partition}
Stop it with: make slurm-dev-stop"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.slurm_dev", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--root", type=Path, default=None, help="the cluster's folder (default: LAB_HOME/slurm-dev)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for both nodes (start)")
    args = parser.parse_args(argv)
    cluster = SlurmCluster(args.root or default_root())

    if args.command == "env":
        print(export_lines(cluster))
        return 0
    if args.command == "status":
        if not cluster.running():
            print(f"No local Slurm cluster running under {cluster.root} (start it with: make slurm-dev)")
            return 1
        states = ", ".join(f"{n} {s}" for n, s in sorted(cluster.node_states().items())) or "no answer from sinfo"
        jobs = ", ".join(f"{j} {s}" for j, s in sorted(cluster.jobs().items(), key=lambda js: int(js[0]))) or "none"
        print(f"Local Slurm cluster running under {cluster.root}: {states}; jobs: {jobs}")
        print(usage(cluster))
        return 0
    if args.command == "stop":
        if not cluster.running() and not cluster.processes():
            print(f"No local Slurm cluster running under {cluster.root}: nothing to stop")
            return 0
        cluster.stop()
        left = cluster.processes()
        if left:
            print(f"Some processes of the cluster are still running: {[(p.pid, p.name()) for p in left]}")
            return 1
        print(f"Local Slurm cluster under {cluster.root} stopped (its jobs cancelled, every daemon ended)")
        return 0

    missing = missing_binaries()
    if missing:
        print(
            f"Slurm commands missing: {', '.join(missing)}. Install Debian's packages: "
            "apt-get install -y slurmctld slurmd slurm-client munge (make slurm-dev does)",
            file=sys.stderr,
        )
        return 1
    if os.geteuid() != 0:
        print("The local cluster runs its daemons as root (SlurmUser=root): run this as root", file=sys.stderr)
        return 1
    was_running = cluster.running()
    try:
        cluster.start(timeout=args.timeout)
    except RuntimeError as err:
        print(f"The local Slurm cluster did not start:\n{err}", file=sys.stderr)
        return 1
    print(f"Local Slurm cluster {'already running' if was_running else 'started'} under {cluster.root}")
    print(usage(cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
