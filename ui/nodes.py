"""A multi-node run seen per node: the Live page's latest figures per node, and per-rank figures summed by node.

A Slurm run's ranks spread over several machines. Its telemetry names the node each sample was taken on
(storage.series.telemetry_series `host`), and each rank's figures name the node it ran on (`host`). These
turn both into what a person reads per node; the runner's own local runs have one node and need none of it.
"""

from __future__ import annotations

import pandas as pd

from ui.format import human_bytes

# Per-rank figures summed over a node's ranks (bytes and seconds add up; a node's peak is its ranks' peaks together,
# since they run at once on that machine).
SUMMED = ("param_bytes", "optimizer_bytes", "peak_mem_bytes", "peak_rss_bytes", "compute_s", "comm_s", "idle_s")


def node_names(series: pd.DataFrame) -> list[str]:
    """The nodes a run's telemetry came from, in name order; [] for samples the runner took on its own host."""
    if series.empty or "host" not in series:
        return []
    return sorted({h for h in series["host"].dropna().astype(str) if h})


def latest_by_node(series: pd.DataFrame) -> pd.DataFrame:
    """Per node of a multi-node run: its GPUs or rank processes, and at their latest sample the utilisation summed
    over them (CPU % adds up over processes; for GPUs the sum over the node's GPUs) and the memory summed.

    Columns: node, sources, util_pct, mem_bytes, t_s (seconds since the run started of that latest sample)."""
    rows = []
    for node in node_names(series):
        mine = series[series["host"] == node]
        last = mine.loc[mine.groupby("source")["t_s"].idxmax()]
        rows.append({
            "node": node,
            "sources": ", ".join(sorted(last["source"].astype(str))),
            "util_pct": float(last["util_pct"].fillna(0).sum()),
            "mem_bytes": int(last["mem_bytes"].fillna(0).sum()),
            "t_s": float(last["t_s"].max()),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["node", "sources", "util_pct", "mem_bytes", "t_s"])


def nodes_caption(series: pd.DataFrame) -> str | None:
    """One line for the Live and run pages: 'n1 (rank0, rank1): 196% CPU, 612.0 MiB · n2 (...)', None off Slurm."""
    table = latest_by_node(series)
    if table.empty:
        return None
    gpu = any(s.startswith("gpu") for s in table["sources"])
    unit = "% GPU" if gpu else "% CPU"
    return " · ".join(
        f"{r.node} ({r.sources}): {r.util_pct:.0f}{unit}, {human_bytes(r.mem_bytes)} at {r.t_s:.0f} s"
        for r in table.itertuples()
    )


def with_node(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per-rank figures with a `node` column: the rank's host, "unrecorded" where a run from before nodes were
    recorded has none."""
    node = ranks["host"].fillna("unrecorded") if "host" in ranks else "unrecorded"
    return ranks.assign(node=node)


def ranks_by_node(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per-rank figures (storage.series.rank_results) grouped per (run, node): the ranks there, and SUMMED over them.

    A rank with no recorded node (runs from before nodes were recorded) counts under "unrecorded"."""
    if ranks.empty:
        return pd.DataFrame(columns=["run_id", "node", "ranks", *SUMMED])
    data = with_node(ranks)
    present = [c for c in SUMMED if c in data]
    grouped = data.groupby(["run_id", "node"], sort=True)
    out = grouped[present].sum(min_count=1).reset_index()
    out.insert(2, "ranks", grouped["rank"].apply(lambda r: ", ".join(str(int(x)) for x in sorted(r))).values)
    return out
