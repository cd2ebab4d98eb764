"""One pipeline rank's point-to-point traffic (`StageLinks`): activations forward and gradients backward between
the ranks of neighbouring virtual stages, batched so that no schedule can deadlock. The engine
(runner/gpt/pipeline.py) runs the schedule and hands its messages here.

Point-to-point, and why it cannot deadlock (`StageLinks`). A stage never sends on its own: what an
operation produces waits in an outbox and leaves in one batch (`batch_isend_irecv`) with the receive the
stage's next operation needs, or alone right before an operation that receives nothing; the stage waits
only on batches holding a receive, and on its remaining sends at the end. In 1F1B's steady state stage s
sends activation i+1 to s+1 and then needs gradient i from it, while s+1 sends gradient i and then needs
activation i+1: with a send followed by a separate receive, both ends send first, and on NCCL a send
larger than its buffers completes only once the peer receives -- while p2p operations of one
communicator run in order on one stream, so each peer's receive sits behind its own send and 1F1B
deadlocks (Megatron-LM sends and receives together, pipeline_parallel/p2p_communication.py, for this
reason). Here both ends post {send, receive} as one NCCL group, which completes as a whole. In general:
model each rank as running its batches one after another, each finishing only when every send in it
meets its receive posted by the peer (no buffering at all, stricter than NCCL and gloo); a send
produced by operation k leaves in the batch right before operation k+1, so it is on offer from the
moment its producer finished, for as long as the sender waits for anything, and the receiver posts the
matching receive right before the operation that consumes it. Every wait is thus for a message its
peer's schedule produces earlier in the pipeline's dependency order (forwards flow up the virtual
stages, backwards down, each rank in schedule order), which has no cycle, so every batch completes.

Interleaved 1F1B and ZB-H1 exchange their messages in lockstep instead (runner/job/schedule_ops.py
lockstep_plan, as Megatron's interleaved schedule sends and receives once per step): the argument
above breaks for interleaving -- with p = 2, rank 0's batch {send activation for rank 1's chunk 0,
receive a gradient} can wait on rank 1's {send an activation for rank 0's chunk 1, receive a gradient}
while each send's receive is posted only after the other's batch (seen on gloo). Every rank derives,
from all ranks' schedules run on a model clock, the tick at which each message is produced; at that
tick sender and receiver both post it in one batch, the receiver possibly ahead of need (the buffer
waits, and the rank waits on it only when the operation consuming it starts). By induction over ticks
every batch completes. The order of messages between two ranks is then the same at both ends
(NCCL and gloo match the k-th send with the k-th receive).
Generation also returns each new token from the last stage to the first, against the flow of
activations: on the same stream a token waiting for the first stage to finish sending this round's
activations would block the last stage's receives of them, so tokens travel on the first and last
stages' own two-rank group (a stream of their own). tests/test_comm_p2p.py and
tests/test_pipeline_schedules.py replay the batches the real code issues in that unbuffered model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from runner.gpt.comm import GroupComm, P2PBatch
from runner.gpt.timing import Mark, StepClock


class StageLinks:
    """One rank's point-to-point traffic: sends wait in an outbox and leave batched with the next receive
    on the same communicator (see the module docstring for why this cannot deadlock).

    `comm` carries activations and their gradients (the default group: every rank joined a collective
    on it in Mesh.build, which NCCL needs before batches between two of its ranks). A message may name
    another communicator -- generation returns each new token from the last stage to the first over the
    pair's own group, so on NCCL it travels on a stream of its own and a token waiting for the first
    stage never holds up the activations behind it. `span(stage, microbatch, phase, start, end)` records
    timeline spans between clock marks."""

    def __init__(self, comm: GroupComm, clock: StepClock, span: Callable[[int, int, str, Mark, Mark], None]):
        self.comm, self.clock, self._span = comm, clock, span
        self._outbox: list[tuple[torch.Tensor, int, tuple[int, int], GroupComm]] = []  # (t, dst, (stage, mb), comm)
        self._inflight: list[tuple[P2PBatch, list[torch.Tensor], tuple[int, int]]] = []  # alive until waited for

    def send(self, t: torch.Tensor, dst: int, at: tuple[int, int], comm: GroupComm | None = None) -> None:
        """Queue t for global rank dst (`at`: the (stage, microbatch) it belongs to, for the timeline); it
        leaves with this rank's next receive on the same communicator, or on its own before the next operation."""
        self._outbox.append((t.contiguous(), dst, at, comm or self.comm))

    def recv(self, shape, dtype: torch.dtype, device: torch.device, src: int, at: tuple[int, int],
             comm: GroupComm | None = None) -> torch.Tensor:  # fmt: skip
        """Receive from global rank src, sending the outbox's messages for the same communicator in the
        same batch (the others leave first, on their own); the wait is idle time."""
        comm = comm or self.comm
        buf = torch.empty(shape, dtype=dtype, device=device)
        along = [m for m in self._outbox if m[3] is comm]
        self._outbox = [m for m in self._outbox if m[3] is not comm]
        self.flush()
        batch = comm.exchange([(t, dst) for t, dst, _, _ in along], [(buf, src)])
        self.wait(batch, at)
        return buf

    def post(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
             at: tuple[int, int]) -> P2PBatch:  # fmt: skip
        """Start one batch of sends (tensor, global dst) and receives (buffer, global src) on `comm` now (a
        lockstep tick); the caller waits for it when it needs a buffer (`wait`), the end of the step otherwise."""
        start = self.clock.mark()
        batch = self.comm.exchange([(t.contiguous(), dst) for t, dst in sends], recvs)
        if sends:
            self._span(*at, "send", start, self.clock.mark())
        if not recvs:
            self._inflight.append((batch, [t for t, _ in sends], at))
        return batch

    def wait(self, batch: P2PBatch, at: tuple[int, int]) -> None:
        """Wait for a batch holding a receive this rank needs now: idle time (once; later calls return)."""
        if batch.works:
            start = self.clock.mark()
            batch.wait(idle=True)
            self._span(*at, "recv_wait", start, self.clock.mark())

    def flush(self) -> None:
        """Start the outbox's sends now, one batch per communicator; never waits for them."""
        if not self._outbox:
            return
        sends, self._outbox = self._outbox, []
        start = self.clock.mark()
        comms = {id(m[3]): m[3] for m in sends}  # communicators in first-use order
        for comm in comms.values():
            mine = [m for m in sends if m[3] is comm]
            batch = comm.exchange([(t, dst) for t, dst, _, _ in mine], [])
            self._inflight.append((batch, [t for t, _, _, _ in mine], mine[-1][2]))
        self._span(*sends[-1][2], "send", start, self.clock.mark())

    def finish(self) -> None:
        """Send what is left and wait for every send still in flight (the end of a schedule)."""
        self.flush()
        if not self._inflight:
            return
        start = self.clock.mark()
        for batch, _, _ in self._inflight:
            batch.wait(idle=False)
        self._span(*self._inflight[-1][2], "send", start, self.clock.mark())
        self._inflight = []
