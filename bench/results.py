"""bench/RESULTS.md: each benchmark script owns one '## ...' section and rewrites only that one."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(heading: str, text: str, path: Path, notes: str = "") -> None:
    """Replace (or add) the section `text` whose first line is `## {heading}`, keeping every other section."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    body = text + (("\n" + notes.strip() + "\n") if notes.strip() else "")
    pattern = re.compile(rf"## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: body + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    path.write_text(new)
