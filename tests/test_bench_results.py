"""bench/RESULTS.md sections: a script rewrites its own section and leaves the others as they are."""

from __future__ import annotations

from bench.results import write_section


def test_a_section_is_replaced_in_place_and_others_are_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("Tensor parallelism", "## Tensor parallelism\n\nold tp\n", path)
    write_section("Pipeline parallelism", "## Pipeline parallelism\n\npp\n", path, notes="why")
    write_section("Tensor parallelism", "## Tensor parallelism\n\nnew tp\n", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "new tp" in text and "old tp" not in text
    assert text.index("## Tensor parallelism") < text.index("## Pipeline parallelism")
    assert "pp\n\nwhy" in text
