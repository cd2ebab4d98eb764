"""The one engine every strategy runs: pipeline stages fed with microbatches, GPipe or 1F1B, with timelines.

Stage s is the GPT cut to layers [s*L/p, (s+1)*L/p) (runner/gpt/model.py cut_stage: the embedding on the
first, final LayerNorm and LM head on the last), tensor-parallel or not; its loss and full logits come
from the output functions it is given (plain, or vocab-parallel under tensor parallelism). With p = 1
and m = 1 it is the plain model ('single', 'tensor'), with m = 1 the guide's layer split ('layer');
runner/gpt/build.py composes it for every strategy. Activations
go forward and their gradients backward by point-to-point messages between neighbours. The schedules
are plain functions over two callbacks:
- `gpipe`: every microbatch's forward, then every backward (stores m activations);
- `one_f_one_b`: p - s - 1 warm-up forwards, then one forward / one backward, then the remaining
  backwards (stores at most p - s activations).

Point-to-point, and why it cannot deadlock (`StageLinks`). A stage never sends on its own: what an
operation (a forward or backward of one microbatch) produces waits in an outbox and leaves in one
batch (`batch_isend_irecv`) with the receive the stage's next operation needs, or alone right before
an operation that receives nothing; the stage waits only on batches holding a receive, and on its
remaining sends at the end. In 1F1B's steady state stage s sends activation i+1 to s+1 and then needs
gradient i from it, while s+1 sends gradient i and then needs activation i+1: with a send followed by a
separate receive, both ends send first, and on NCCL a send larger than its buffers completes only once
the peer receives -- while p2p operations of one communicator run in order on one stream, so each
peer's receive sits behind its own send and 1F1B deadlocks (Megatron-LM sends and receives together,
pipeline_parallel/p2p_communication.py, for this reason). Here both ends post {send, receive} as one
NCCL group, which completes as a whole. In general: model each rank as running its batches one after
another, each finishing only when every send in it meets its receive posted by the peer (no
buffering at all, stricter than NCCL and gloo); a send produced by operation k leaves in the batch
right before operation k+1, so it is on offer from the moment its producer finished, for as long as
the sender waits for anything, and the receiver posts the matching receive right before the
operation that consumes it. Every wait is thus for a message its peer's schedule produces earlier in
the pipeline's dependency order (forwards flow up the stages, backwards down, each stage in schedule
order), which has no cycle, so every batch completes. Generation also returns each new token from the
last stage to the first, against the flow of activations: on the same stream a token waiting for
the first stage to finish sending this round's activations would block the last stage's receives of
them, so tokens travel on the first and last stages' own two-rank group (a stream of their own).
tests/test_comm_p2p.py replays the batches the real code issues for every stage of GPipe and 1F1B
(p up to 8; train, forward and generate) in that unbuffered model, and shows that the model catches
the deadlock of a send started on its own before the receive.

Timing comes from the rank's StepClock (runner/gpt/timing.py): host time on CPU, CUDA events on GPU,
resolved at the end of the step. Each stage records (microbatch, phase, start, end) spans since the
step's origin: `forward` and `backward` (compute), `recv_wait` (blocked on a batch holding a receive:
the pipeline bubble is made of these, booked as idle time) and `send` (starting sends that travel
alone, and waiting for the last ones at the end of the step). Stored activations are counted two
ways: microbatches in flight (forward done, backward not yet) and the bytes autograd saved for them
(a saved-tensors hook sums the distinct storages each microbatch's forward keeps). The last stage
sums its microbatches' losses on the device and reads the total once, after the schedule, so no
microbatch waits for the host. `forward` and `generate` run microbatches through the stages as an
assembly line; in `generate` every microbatch of requests keeps its own KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from runner.gpt.comm import GroupComm, P2PBatch
from runner.gpt.mesh import Mesh
from runner.gpt.model import GPT, KVCache, WholeVocabulary, greedy_generate, shard_of
from runner.gpt.strategy import ParallelGPT
from runner.gpt.timing import Mark, StepClock
from runner.gpt.tp_layers import TPState, all_reduce_sequence_parallel_grads


def gpipe(n_micro: int, forward: Callable[[int], None], backward: Callable[[int], None]) -> None:
    """All forwards, then all backwards (in reverse order, as GPipe does)."""
    for i in range(n_micro):
        forward(i)
    for i in reversed(range(n_micro)):
        backward(i)


def one_f_one_b(
    n_micro: int, n_stages: int, stage: int, forward: Callable[[int], None], backward: Callable[[int], None]
) -> None:
    """Warm-up forwards (p - stage - 1), steady one-forward-one-backward, cool-down backwards."""
    warmup = min(n_stages - stage - 1, n_micro)
    for i in range(warmup):
        forward(i)
    for i in range(n_micro - warmup):
        forward(warmup + i)
        backward(i)
    for i in range(n_micro - warmup, n_micro):
        backward(i)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def stage_layers(n_layer: int, n_stages: int, stage: int) -> tuple[int, int]:
    """[first, last) layer ids of `stage` when n_layer splits evenly over n_stages."""
    if n_layer % n_stages:
        raise ValueError(f"n_layer {n_layer} does not split over {n_stages} stages")
    per = n_layer // n_stages
    return stage * per, (stage + 1) * per


class StageLinks:
    """One stage's point-to-point traffic: sends wait in an outbox and leave batched with the next receive
    on the same communicator (see the module docstring for why this cannot deadlock).

    `comm` carries activations and their gradients (the default group: every rank joined a collective
    on it in Mesh.build, which NCCL needs before batches between two of its ranks). A message may name
    another communicator -- generation returns each new token from the last stage to the first over the
    pair's own group, so on NCCL it travels on a stream of its own and a token waiting for the first
    stage never holds up the activations behind it. `span(microbatch, phase, start, end)` records
    timeline spans between clock marks."""

    def __init__(self, comm: GroupComm, clock: StepClock, span: Callable[[int, str, Mark, Mark], None]):
        self.comm, self.clock, self._span = comm, clock, span
        self._outbox: list[tuple[torch.Tensor, int, int, GroupComm]] = []  # (tensor, global dst, microbatch, comm)
        self._inflight: list[tuple[P2PBatch, list[torch.Tensor], int]] = []  # kept alive until waited for

    def send(self, t: torch.Tensor, dst: int, microbatch: int, comm: GroupComm | None = None) -> None:
        """Queue t for global rank dst; it leaves with this stage's next receive on the same
        communicator, or on its own right before the next operation."""
        self._outbox.append((t.contiguous(), dst, microbatch, comm or self.comm))

    def recv(
        self, shape, dtype: torch.dtype, device: torch.device, src: int, microbatch: int, comm: GroupComm | None = None
    ) -> torch.Tensor:
        """Receive from global rank src, sending the outbox's messages for the same communicator in the
        same batch (the others leave first, on their own); the wait is idle time."""
        comm = comm or self.comm
        buf = torch.empty(shape, dtype=dtype, device=device)
        along = [m for m in self._outbox if m[3] is comm]
        self._outbox = [m for m in self._outbox if m[3] is not comm]
        self.flush()
        start = self.clock.mark()
        batch = comm.exchange([(t, dst) for t, dst, _, _ in along], [(buf, src)])
        batch.wait(idle=True)
        self._span(microbatch, "recv_wait", start, self.clock.mark())
        return buf

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
        self._span(sends[-1][2], "send", start, self.clock.mark())

    def finish(self) -> None:
        """Send what is left and wait for every send still in flight (the end of a schedule)."""
        self.flush()
        if not self._inflight:
            return
        start = self.clock.mark()
        for batch, _, _ in self._inflight:
            batch.wait(idle=False)
        self._span(self._inflight[-1][2], "send", start, self.clock.mark())
        self._inflight = []


class PipelineGPT(ParallelGPT):
    """One stage of the pipeline: `stage` is the GPT cut to this stage's blocks (runner/gpt/model.py
    cut_stage, tensor-parallel or not); `output` turns the last stage's output into the loss and full
    logits. With one stage and one microbatch it is the whole model, tensor-parallel or not ('single',
    'tensor'); with one microbatch it is the guide's layer split ('layer')."""

    def __init__(
        self, stage: GPT, output: WholeVocabulary | TPState, mesh: Mesh, device: torch.device, dtype: torch.dtype,
        microbatches: int = 1, schedule: str = "1f1b", workload: str = "train",
    ):  # fmt: skip
        super().__init__(stage.config, mesh, device, dtype)
        self.stage, self.output = stage, output
        self.stage_id, self.n_stages = mesh.coord.pp, mesh.pp_size
        self.n_micro, self.schedule, self.workload = microbatches, schedule, workload
        self.prev = mesh.stage_rank(self.stage_id - 1) if not mesh.is_first_stage else None
        self.next = mesh.stage_rank(self.stage_id + 1) if not mesh.is_last_stage else None
        self._shards = dict(stage.named_parameters(remove_duplicate=False))
        self._sp_params = [p for p in stage.parameters() if getattr(p, "sequence_parallel", False)]
        self._spans: list[dict] = []
        self.clock = mesh.stats.clock
        self.links = StageLinks(mesh.world, self.clock, self._span)
        self.max_inflight = 0
        self.peak_activation_bytes = 0
        self.microbatch_activation_bytes = 0
        self._param_storages: set[int] | None = None
        # One stage, one microbatch: each gradient is final once accumulated, so data parallelism may
        # start reducing it during backward (not under sequence parallelism: some are summed afterwards).
        self.single_backward_pass = self.n_stages == 1 and self.n_micro == 1 and not self._sp_params

    # ---- what the stage computes ----------------------------------------------------------
    def run_stage(
        self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        return self.stage(x, cache=cache, start=start, last_only=last_only)

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.output.loss(out, targets)

    def next_token(self, out: torch.Tensor) -> torch.Tensor:
        return self.output.full_logits(out[:, -1:, :])[:, -1, :].argmax(dim=-1, keepdim=True)

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the tied embedding / LM head weight, if it holds one."""
        if self.prev is None:
            return self.stage.transformer.wte.weight
        if self.next is None:
            return self.stage.lm_head.weight
        return None

    def named_shards(self) -> dict[str, nn.Parameter]:
        return self._shards

    def shard_index(self, name: str):
        return shard_of(self._shards[name]).index

    @property
    def is_output_rank(self) -> bool:
        return self.next is None and (self.mesh.tp is None or self.mesh.tp.index == 0)

    # ---- bookkeeping ------------------------------------------------------------------------
    def begin_step(self, step: int, start: float) -> None:
        super().begin_step(step, start)
        self._spans = []

    def take_spans(self) -> list[dict]:
        self.clock.resolve()  # a no-op where the job has resolved the step already
        spans, self._spans = self._spans, []
        return spans

    def _span(self, microbatch: int, phase: str, start: Mark, end: Mark) -> None:
        def sink(start_s: float, end_s: float) -> None:
            self._spans.append({"stage": self.stage_id, "microbatch": microbatch, "phase": phase,
                                "start": start_s, "end": end_s})  # fmt: skip

        self.clock.add(start, end, sink)

    def _recv(self, shape, dtype, src: int, microbatch: int) -> torch.Tensor:
        return self.links.recv(shape, dtype, self.device, src, microbatch)

    def _send(self, t: torch.Tensor, dst: int, microbatch: int) -> None:
        self.links.send(t, dst, microbatch)

    def _begin_compute(self) -> Mark:
        """Start an operation: sends its receive did not carry (it had none) leave now; returns its start."""
        self.links.flush()
        return self.clock.mark()

    def _hidden_shape(self, mb: torch.Tensor) -> tuple[int, ...]:
        return (mb.shape[0], mb.shape[1], self.config.n_embd)

    @contextmanager
    def _saving_into(self, storages: dict[int, int]) -> Iterator[None]:
        """Record, for every tensor autograd saves meanwhile, its storage and size in `storages` (by address).
        Parameters are skipped: they live anyway; what a microbatch in flight costs is its activations."""
        if self._param_storages is None:  # parameters keep their storage (optimizers update in place)
            self._param_storages = {q.untyped_storage().data_ptr() for q in self.stage.parameters()}
        params = self._param_storages

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages.setdefault(storage.data_ptr(), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def figures(self) -> dict:
        p, m = self.n_stages, self.n_micro
        out = {
            "max_inflight_microbatches": self.max_inflight,
            "peak_activation_bytes": self.peak_activation_bytes,
            "activation_bytes_per_microbatch": self.microbatch_activation_bytes,
        }
        if p > 1 and self.workload == "train":
            # Only where a pipeline trains: (p-1)/(m+p-1) is the idle share of each stage when every
            # stage's forward and backward take equal times and messages cost nothing (GPipe, Huang et
            # al. 2019; the same for 1F1B, Narayanan et al. 2021). The job measures the real one.
            out["bubble_fraction_theory"] = (p - 1) / (m + p - 1)
        return out

    # ---- workloads --------------------------------------------------------------------------
    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        mbs, tgts = idx.chunk(self.n_micro), targets.chunk(self.n_micro)
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        total_loss = torch.zeros((), device=self.device, dtype=torch.float32)
        inflight = 0
        saved: dict[int, int] = {}  # bytes autograd keeps for each microbatch in flight

        def forward(i: int) -> None:
            nonlocal total_loss, inflight
            if self.prev is None:
                x = mbs[i]
            else:
                x = self._recv(self._hidden_shape(mbs[i]), self.dtype, self.prev, i).requires_grad_(True)
            start = self._begin_compute()
            storages: dict[int, int] = {}
            with self._saving_into(storages):
                out = self.run_stage(x)
                if self.next is None:
                    # Each microbatch's mean loss over m microbatches: the gradients of the global mean.
                    out = self.loss(out, tgts[i]) / self.n_micro
            if self.next is None:
                total_loss += out.detach().float()  # read once after the schedule, not per microbatch
            self._span(i, "forward", start, self.clock.mark())
            inputs[i], outputs[i] = x, out
            inflight += 1
            self.max_inflight = max(self.max_inflight, inflight)
            saved[i] = sum(storages.values())
            self.microbatch_activation_bytes = max(self.microbatch_activation_bytes, saved[i])
            self.peak_activation_bytes = max(self.peak_activation_bytes, sum(saved.values()))
            if self.next is not None:
                self._send(out.detach(), self.next, i)

        def backward(i: int) -> None:
            nonlocal inflight
            out = outputs.pop(i)
            grad = None if self.next is None else self._recv(tuple(out.shape), out.dtype, self.next, i)
            start = self._begin_compute()
            out.backward(grad)
            self._span(i, "backward", start, self.clock.mark())
            x = inputs.pop(i)
            inflight -= 1
            del saved[i]
            if self.prev is not None:
                self._send(x.grad, self.prev, i)

        if self.schedule == "gpipe":
            gpipe(self.n_micro, forward, backward)
        else:
            one_f_one_b(self.n_micro, self.n_stages, self.stage_id, forward, backward)
        self.links.finish()
        self.sync_tied_embedding()
        if self._sp_params:
            all_reduce_sequence_parallel_grads(self._sp_params, self.mesh.tp)
        return total_loss.item() if self.is_output_rank else None

    def sync_tied_embedding(self) -> None:
        weight = self.tied_weight()
        if self.mesh.embed is not None and weight is not None and weight.grad is not None:
            # The last stage gets here while the first one still runs its last backwards: that wait is
            # pipeline bubble (idle), not the all-reduce's communication time.
            self.mesh.embed.wait_for_peers()
            self.mesh.embed.all_reduce(weight.grad)

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        outs = []
        for i, mb in enumerate(idx.chunk(self.n_micro)):
            x = mb if self.prev is None else self._recv(self._hidden_shape(mb), self.dtype, self.prev, i)
            start = self._begin_compute()
            out = self.run_stage(x)
            self._span(i, "forward", start, self.clock.mark())
            if self.next is not None:
                self._send(out, self.next, i)
            else:
                outs.append(self.output.full_logits(out))  # under tensor parallelism every tp rank gathers
        self.links.finish()
        return torch.cat(outs) if self.is_output_rank else None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        mbs = idx.chunk(self.n_micro)
        caches = [KVCache.empty(self.config.n_layer) for _ in mbs]
        first_rank, last_rank = self.mesh.stage_rank(0), self.mesh.stage_rank(self.n_stages - 1)

        def step(i: int, tokens: torch.Tensor, pos: int, round_: int) -> torch.Tensor | None:
            rows = mbs[i].shape[0]
            if self.prev is not None:
                x = self._recv((rows, tokens.shape[1], self.config.n_embd), self.dtype, self.prev, i)
            elif round_ > 0 and self.n_stages > 1:  # the token the last stage picked one round ago
                x = self.links.recv((rows, 1), torch.long, self.device, last_rank, i, comm=self.mesh.embed)
            else:
                x = tokens
            start = self._begin_compute()
            out = self.run_stage(x, cache=caches[i], start=pos, last_only=True)
            self._span(i, "forward", start, self.clock.mark())
            if self.next is not None:
                self._send(out, self.next, i)
                return None
            nxt = self.next_token(out)
            if self.n_stages > 1 and round_ + 1 < new_tokens:
                self.links.send(nxt, first_rank, i, comm=self.mesh.embed)
            return nxt

        with self.output.whole_sequences():  # one position a pass: nothing to split over the sequence
            out = greedy_generate(list(mbs), new_tokens, step)
        self.links.finish()
        return torch.cat(out) if self.is_output_rank else None
