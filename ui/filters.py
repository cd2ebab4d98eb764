"""The History page's filters as data: days from the address and the date picker, and the RunFilter they make."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from runner.api import RunFilter

FILTERS = ("status", "strategy", "model", "workload", "user")  # multiselects; tag and days besides


def parse_day(text: str | None) -> date | None:
    """A YYYY-MM-DD day from the address; None when absent or not a day."""
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


def day_range(days) -> tuple[date | None, date | None]:
    """st.date_input gives (), (start,) while the second day is being picked, or (start, end)."""
    days = tuple(days) if isinstance(days, list | tuple) else (days,) if days else ()
    return (days[0] if days else None), (days[1] if len(days) > 1 else None)


def run_filter(chosen: dict[str, list[str]], tag: str, since: date | None, until: date | None) -> RunFilter:
    """The filter of the chosen values (none chosen: any), a tag, and created days from `since` through `until`
    inclusive (UTC days)."""
    return RunFilter(
        **{n: chosen.get(n) or None for n in FILTERS},
        tag=[tag] if tag else None,
        since=datetime.combine(since, time.min, tzinfo=UTC) if since else None,
        until=datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC) if until else None,
    )
