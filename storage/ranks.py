"""RankFigures <-> rank_results rows: the one place that knows which figures are columns and which `extra`.

The table keeps the figures every strategy reports as columns (so SQL can sort and sum them) and the
rest (memory detail, CPU placement, a pipeline stage's bubble, strategy figures) in the JSON column
`extra`. to_row() splits a rank's figures that way; from_row() gives back the one typed record
(runner.spec.records.RankFigures), whichever version of the job wrote them. Nothing else reads `extra`.
"""

from __future__ import annotations

from typing import Any

from runner.spec.records import RankFigures
from storage.models import RankResult

COLUMNS = ("rank", "tp", "pp", "dp", "param_count", "param_bytes", "optimizer_bytes", "peak_mem_bytes",
           "compute_s", "comm_s", "idle_s", "comm_bytes", "comm_calls")  # fmt: skip


def to_row(run_id: int, rank: RankFigures) -> dict[str, Any]:
    """The rank_results row of one rank's figures (a missing or null column keeps the table's default)."""
    figures = rank.to_dict()
    return {
        "run_id": run_id,
        **{k: figures[k] for k in COLUMNS if figures.get(k) is not None},
        "extra": {k: v for k, v in figures.items() if k not in COLUMNS},
    }


def from_row(row: RankResult) -> RankFigures:
    """One rank's figures: the columns, then whatever `extra` holds."""
    return RankFigures.from_dict({**{k: getattr(row, k) for k in COLUMNS}, **(row.extra or {})})
