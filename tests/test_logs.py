"""Log capping: a log over the cap keeps its beginning and its latest lines, and says what was cut."""

from __future__ import annotations

import os

from runner.service.logs import cap_log


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


def test_trimming_while_a_process_appends_never_drops_a_line_it_wrote(tmp_path):
    """A real writer process appends numbered lines as fast as it can while the log is capped again and again.
    After every cut, the lines after the newest marker are consecutive (the cut kept the latest lines and lost
    none a rank wrote meanwhile), and the last line written is at the end. (Rewriting the file instead loses
    hundreds of lines here in 3 s.)"""
    import re
    import subprocess
    import sys

    path = tmp_path / "rank0.log"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)\n"
        "end = time.monotonic() + 3; n = 0\n"
        "while time.monotonic() < end:\n"
        "    os.write(fd, b'L%08d:' % n + b'x' * 100 + b'\\n'); n += 1\n"
        "print(n - 1)\n")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = re.compile(r"L(\d{8}):x{100}")
    cuts, gaps = 0, []
    while writer.poll() is None:
        if cap_log(path, cap=64 * 1024) > 0:
            cuts += 1
            latest = path.read_text().rsplit("bytes cut by the runner", 1)[-1]
            numbers = [int(m.group(1)) for m in map(line.fullmatch, latest.split("\n")) if m]
            gaps += [(a, b) for a, b in zip(numbers, numbers[1:], strict=False) if b != a + 1]
    last = int(writer.stdout.read())
    assert cuts >= 5 and gaps == []
    assert path.read_text().endswith(f"L{last:08d}:" + "x" * 100 + "\n")


def test_profiler_lines_are_left_out_of_the_tails_people_read_and_kept_in_the_log(tmp_path):
    from runner.service.logs import LogText, read_log, without_profiler_noise
    from ui.hosts import last_lines

    # as a CPU rank's log reads after the job measured its tensor peak (runner/job/resources.py)
    text = (
        "step 3/3 (timed) 461.1 ms loss 6.2608\n"
        "USDT:2026-12-07 00:13:24 21779:21779 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
        "[rank0]:[W1207 00:13:24.055438139 CPUAllocator.cpp:245] Memory block of unknown size was allocated before "
        "the profiling started, profiler results will not include the deallocation event\n"
        "USDT:2026-12-07 00:13:25 21779:21779 SyncActivityProfilerHandler.cpp:59] profiler_stop\n"
        "tensor peak: 2 untimed steps under the profiler, 2.56 s\n"
    )
    (tmp_path / "rank0.log").write_text(text)
    assert without_profiler_noise(text) == (
        "step 3/3 (timed) 461.1 ms loss 6.2608\ntensor peak: 2 untimed steps under the profiler, 2.56 s\n",
        3,
    )
    assert last_lines([LogText("rank0", text, "folder")], 3) == (
        "--- rank 0\nstep 3/3 (timed) 461.1 ms loss 6.2608\ntensor peak: 2 untimed steps under the profiler, 2.56 s"
    )
    assert read_log(tmp_path, "rank0") == text  # the log itself keeps every line
