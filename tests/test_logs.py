"""Log capping: a log over the cap keeps its beginning and its latest lines, and says what was cut."""

from __future__ import annotations

import os

from runner.logs import cap_log


def test_a_small_log_is_left_alone(tmp_path):
    path = tmp_path / "rank0.log"
    path.write_text("hello\n")
    assert cap_log(path, cap=1000) == 0
    assert path.read_text() == "hello\n"


def test_a_large_log_keeps_head_and_tail_and_appends_continue_at_the_end(tmp_path):
    path = tmp_path / "rank1.log"
    lines = [f"line {i:06d}\n" for i in range(20_000)]  # 240 kB
    path.write_text("".join(lines))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # a rank's descriptor, opened before the cut
    cut = cap_log(path, cap=40_000)
    assert cut > 0
    os.write(fd, b"after the cut\n")
    os.close(fd)
    text = path.read_text()
    assert len(text) < 40_000
    assert text.startswith("line 000000\n")
    assert f"[... {cut} bytes cut by the runner" in text
    assert "line 019999\nafter the cut\n" in text
