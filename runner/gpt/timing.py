"""One step clock for every timed figure: communication and idle seconds, the pipeline's timeline spans and
the collectives' segments among them (`collective_spans`).

`StepClock.mark()` returns a point in time; `add(start, end, sink)` registers an interval between two
marks; `resolve()` turns every registered interval into seconds (since the step's origin mark, set by
`start_step()`) and hands them to their sinks. The job resolves once, at the end of each step, so
nothing inside a step waits for the device.

On CPU a mark is `time.perf_counter()`: the ranks' main threads do the work, so host time is the time.

On CUDA a mark is a `torch.cuda.Event(enable_timing=True)` recorded on the *current stream*: it
completes, and so takes its timestamp, when the device has finished everything queued on that stream
before it. Kernels are asynchronous, so a host clock around a call would measure its launch, not its
execution. What the events mean around communication (PyTorch's ProcessGroupNCCL semantics):
- NCCL runs every collective on its own stream, which first waits for the current stream (so it
  starts after the compute queued before it). A synchronous collective, or `work.wait()` on an
  asynchronous one, makes the current stream wait for the NCCL stream -- the stream, not the host.
- So an event recorded just before a collective completes when the compute queued before it has
  finished, and an event recorded just after it completes when the collective has completed on the
  device; their difference is how long this rank's compute stream stood still for that collective,
  including any wait for a late peer. The same holds for a point-to-point receive and its wait.
- Compute spans (a pipeline stage's forward, backward) are the device time between the events
  around their kernels, not the time to launch them.
`resolve()` needs the events to have completed, which is the one `torch.cuda.synchronize` of the step.
Nothing else in a timed step synchronizes the device, so communication that overlaps compute on the
device (data parallelism's bucketed all-reduce during backward, pipeline sends) still overlaps.

Switching it off: a clock with `enabled = False` returns None from `mark()` and ignores `add()`, so
no event is created and no interval kept; with `CommStats.counting` also False (runner/gpt/comm.py)
a step runs with no instrumentation at all, which is how a benchmark measures what it costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# A point in time: host seconds (CPU), a recorded CUDA event (GPU), or None while the clock is off.
Mark = float | torch.cuda.Event | None
Sink = Callable[[float, float], None]  # receives (start, end), seconds since the step's origin


@dataclass
class StepClock:
    """Marks and intervals for one rank on one device; see the module docstring for the semantics."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = True
    _origin: Mark = None
    _pending: list[tuple[Mark, Mark, Sink]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def mark(self) -> Mark:
        """Now: on CUDA, when the work queued so far on the current stream has finished."""
        if not self.enabled:
            return None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start_step(self) -> None:
        """The step's zero, right after the barrier that starts it (every rank leaves it together)."""
        self._origin = self.mark()

    def add(self, start: Mark, end: Mark, sink: Sink) -> None:
        """Register [start, end]; `sink` gets it in seconds at the next resolve()."""
        if start is not None and end is not None:
            self._pending.append((start, end, sink))

    def resolve(self) -> None:
        """Turn every pending interval into seconds since the origin and hand it to its sink.
        On CUDA this waits for the device once; with nothing pending it costs nothing."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        origin = self._origin if self._origin is not None else pending[0][0]
        if self.cuda:
            torch.cuda.synchronize(self.device)  # every event of the step has now completed
            for start, end, sink in pending:
                # elapsed_time is in milliseconds, between two events recorded on the device.
                sink(origin.elapsed_time(start) / 1e3, origin.elapsed_time(end) / 1e3)
        else:
            for start, end, sink in pending:
                sink(start - origin, end - origin)

    def end_step(self, end: Mark) -> float:
        """Close the step at mark `end`: resolve every interval (on CUDA the step's one synchronize)
        and return the step's length in seconds, origin to end (0.0 while the clock is off)."""
        length: list[float] = []
        self.add(self._origin, end, lambda a, b: length.append(b - a))
        self.resolve()
        return length[0] if length else 0.0


PASSES = ("forward", "backward", "weight")


def collective_spans(spans: list[dict], segments: list[tuple[str, float, float]], stage: int) -> list[dict]:
    """Timeline spans of the collectives a step's clock timed (CommStats.segments: tensor parallelism's inside a
    pass, data parallelism's and ZeRO's waits), each named by its kind and put on the pass it ran in, so a lane
    shows where communication took its time; outside any pass: the rank's first stage, microbatch -1."""
    passes = [s for s in spans if s["phase"] in PASSES]
    home = min((s["stage"] for s in spans), default=stage)
    out = []
    for kind, start, end in segments:
        mid = (start + end) / 2
        inside = next((s for s in passes if s["start"] <= mid <= s["end"]), None)
        out.append({"stage": inside["stage"] if inside else home, "microbatch": inside["microbatch"] if inside else -1,
                    "phase": kind, "start": start, "end": end})  # fmt: skip
    return out
