"""Test-only job entry: the real `runner.job` for strategy 'data', recording when each gradient bucket's
all-reduce completes and when backward ends, so a test can see communication finish during compute.

A bucket's completion time is taken by a callback on its work's future, which gloo runs on the
thread that completes the collective, the moment it does; backward has ended when DataParallelGPT
starts averaging (forward_backward calls it right after the inner backward returns). Per rank, the bucket count
and the most buckets any step saw done before its backward ended land in result.json as `test_buckets` and
`test_buckets_done_in_backward`: on a busy machine one step's partner rank can lag a whole backward behind.
"""

from __future__ import annotations

import os
import sys
import time

from runner.gpt.comm import GroupComm
from runner.gpt.data_parallel import DataParallelGPT
from runner.job import rank as job

_done: list[float] = []  # completion times of this step's bucket all-reduces
_last: dict[str, int] = {"test_buckets": 0, "test_buckets_done_in_backward": 0}

_all_reduce_async = GroupComm.all_reduce_async
_average = DataParallelGPT.average_gradients
_forward_backward = DataParallelGPT.forward_backward
_figures = DataParallelGPT.figures


def all_reduce_async(self, t):
    pending = _all_reduce_async(self, t)
    pending.work.get_future().then(lambda _: _done.append(time.perf_counter()))
    return pending


def average_gradients(self):
    backward_end = time.perf_counter()
    _average(self)  # waits for every bucket, so every callback has run when it returns
    _last["test_buckets"] = len(_done)
    done = sum(t < backward_end for t in _done)
    _last["test_buckets_done_in_backward"] = max(_last["test_buckets_done_in_backward"], done)


def forward_backward(self, idx, targets):
    _done.clear()
    return _forward_backward(self, idx, targets)


GroupComm.all_reduce_async = all_reduce_async
DataParallelGPT.average_gradients = average_gradients
DataParallelGPT.forward_backward = forward_backward
DataParallelGPT.figures = lambda self: {**_figures(self), **_last}

if __name__ == "__main__":
    code = job.main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as runner.job does: no interpreter finalisation under gloo's threads
