"""Human-readable figures: bytes, durations, statuses, and the per-rank table as people read it."""

from __future__ import annotations

import math

import pandas as pd

STATUS_ICONS = {
    "queued": "◷",
    "running": "▶",
    "succeeded": "✔",
    "failed": "✖",
    "cancelled": "■",
    "lost": "?",
}


def human_bytes(n: float | int | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    # Each unit is chosen by the value as printed: 0.99999 s reads "1.0 s", not "1000.0 ms".
    if round(seconds * 1e6) < 1000:
        return f"{seconds * 1e6:.0f} µs"
    if round(seconds * 1e3, 1) < 1000:
        return f"{seconds * 1e3:.1f} ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def human_age(seconds: float | None) -> str:
    """How long ago, to the second: a heartbeat 0.09 s old reads "1 s", not "90.0 ms" that flickers every refresh."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    return human_duration(seconds)


def human_rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None or (isinstance(tokens_per_s, float) and math.isnan(tokens_per_s)):
        return "—"
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f} M tok/s"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f} k tok/s"
    return f"{tokens_per_s:.3g} tok/s"  # a slow generate run makes 1.37, not "1"


def ranks_text(count: int) -> str:
    """"1 rank", "4 ranks"."""
    return f"{count} rank{'s' if count != 1 else ''}"


def status_label(status: str) -> str:
    return f"{STATUS_ICONS.get(status, '')} {status}".strip()


MIB = 2**20


def rank_table(ranks: pd.DataFrame) -> pd.DataFrame:
    """rank_results() rows for display: the node each rank ran on, sizes in MiB, seconds rounded, only collectives that moved bytes
    (payload by kind, then the estimated wire bytes by kind), and only figures the run recorded."""
    out = pd.DataFrame({c: ranks[c] for c in ("rank", "tp", "pp", "dp") if c in ranks})
    if "host" in ranks and ranks["host"].notna().any():  # the node each rank ran on (runs before it have none)
        out.insert(1, "node", ranks["host"])
    if "param_count" in ranks:
        out["parameters"] = ranks["param_count"]
    sizes = (
        ("param_bytes", "params MiB"),
        ("grad_bytes", "grads MiB"),  # ZeRO runs record what a rank holds after the reduction
        ("optimizer_bytes", "AdamW MiB"),
        ("peak_activation_bytes", "activations kept MiB"),  # saved for backward at the step's peak (pipelines)
        ("activation_bytes_saved_peak", "checkpointing saved MiB"),  # what checkpointing did not keep
        ("peak_tensor_bytes", "tensor peak MiB"),  # the most its tensors held at once (what the planner predicts)
        ("cublas_workspace_bytes", "cuBLAS workspaces MiB"),  # CUDA: in the run's peak, not in the tensor peak
        ("peak_mem_bytes", "run's peak MiB"),  # what the run itself allocated (above set-up on CPU)
        ("peak_rss_bytes", "process peak RSS MiB"),  # the whole process: interpreter, torch, buffers
        ("weights_bytes_read", "weights read MiB"),  # of a Hugging Face folder: this rank's own slices
    )
    for col, name in sizes:
        if col in ranks and ranks[col].notna().any():  # runs recorded before peak_rss_bytes have none
            out[name] = (ranks[col].astype(float) / MIB).round(2)
    if "zero_stage" in ranks and ranks["zero_stage"].fillna(0).any():
        out["ZeRO"] = ranks["zero_stage"]
    if "precision" in ranks and ranks["precision"].notna().any():
        out["precision"] = ranks["precision"]
    for col in ("compute_s", "comm_s", "idle_s", "recompute_s", "cpu_wait_s"):
        if col in ranks and ranks[col].notna().any():
            out[col.removesuffix("_s").replace("_", " ") + " s"] = ranks[col].astype(float).round(4)
    for col in sorted(c for c in ranks.columns if c.startswith("comm_bytes_")):
        if ranks[col].fillna(0).any():  # a layer split never all-reduces: no column of zeros
            out[col.removeprefix("comm_bytes_") + " MiB"] = (ranks[col] / MIB).round(3)
    if "comm_wire_bytes" in ranks:  # a dict by kind per rank (None for runs recorded before wire estimates)
        wire = pd.DataFrame([w if isinstance(w, dict) else {} for w in ranks["comm_wire_bytes"]], index=ranks.index)
        for kind in sorted(wire.columns):
            if wire[kind].fillna(0).any():
                out[kind + " wire MiB"] = (wire[kind] / MIB).round(3)
    return out


IDENTITY = ("rank", "node", "tp", "pp", "dp")


def rank_tables(ranks: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rank_table in two narrower tables that fit a page without being cut: (what each rank held -- parameters,
    sizes in MiB, ZeRO, precision --, where its time and bytes went -- seconds, payload and wire MiB by kind),
    each led by the rank's coordinates, its numbers as text to four significant digits."""
    table = rank_table(ranks)
    ids = [c for c in IDENTITY if c in table]
    held = [c for c in table.columns if c in ("parameters", "ZeRO", "precision")
            or (c.endswith(" MiB") and c.split(" ")[0] not in COMM_KINDS)]  # fmt: skip (payload and wire: spent)
    spent = [c for c in table.columns if c not in ids and c not in held]
    return _as_text(table[ids + held]), _as_text(table[ids + spent])


COMM_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv")


def _as_text(table: pd.DataFrame) -> pd.DataFrame:
    def cell(x: object) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "—"
        if isinstance(x, int | float) and not isinstance(x, bool):
            return f"{x:,}" if float(x).is_integer() and abs(x) >= 1000 else f"{x:.4g}"
        return str(x)

    return table.map(cell)
