"""The one engine every strategy runs: pipeline stages fed with microbatches on a schedule, with timelines.

Rank r of p holds v model chunks (runner/job/schedule_ops.py): chunk c is virtual stage c*p + r, the GPT cut
to layers [j*L/(pv), (j+1)*L/(pv)) of virtual stage j (runner/gpt/model.py cut_stage: the embedding on
virtual stage 0, final LayerNorm and LM head on the last), tensor-parallel or not; its loss and full
logits come from the output functions it is given (plain, or vocab-parallel under tensor parallelism).
With p = 1 it is the plain model ('single', 'tensor'; m > 1: gradient accumulation, each microbatch's forward
and backward in turn, the gradients added up before one optimizer step), with m = 1 the guide's layer split
('layer'); runner/gpt/build.py composes it for every strategy (`cut_chunks` cuts a rank's chunks). A
training step runs the rank's list of operations from runner/job/schedule_ops.py (`schedule_ops`: GPipe,
1F1B, interleaved 1F1B, ZB-H1) as it is: F (forward of one chunk on one microbatch), B (its backward; in
ZB-H1 only the input gradient) and W (ZB-H1's weight gradients). Activations go forward and their
gradients backward by point-to-point messages between the ranks of neighbouring virtual stages (with
v > 1 the last rank feeds the first one again).

Point-to-point traffic between the stages, and why it cannot deadlock: runner/gpt/stage_links.py.

Timing comes from the rank's StepClock (runner/gpt/timing.py): host time on CPU, CUDA events on GPU,
resolved at the end of the step. Each rank records (virtual stage, microbatch, phase, start, end) spans
since the step's origin: `forward`, `backward` and `weight` (compute: ZB-H1's B is `backward`, its W
`weight`), `recv_wait` (blocked on a batch holding a receive: the pipeline bubble is made of these,
booked as idle time) and `send` (starting sends that travel alone, and waiting for the last ones at the
end of the step). Stored activations are counted two ways: chunk-microbatches in flight (forward done,
backward -- in ZB-H1 its W -- not yet) and the bytes autograd saved for them (a saved-tensors hook sums
the distinct storages each forward keeps). The last stage sums its microbatches' losses on the device
and reads the total once, after the schedule, so no microbatch waits for the host. `forward` and
`generate` run each microbatch through the rank's chunks in order, as an assembly line; in `generate`
every microbatch of requests keeps its own KV cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from runner.gpt.comm import P2PBatch
from runner.gpt.mesh import Mesh
from runner.gpt.model import GPT, KVCache, WholeVocabulary, cut_stage, greedy_generate, shard_of
from runner.gpt.schedules import input_grad_pass, weight_grad_pass
from runner.gpt.stage_links import StageLinks
from runner.gpt.strategy import ParallelGPT
from runner.gpt.timing import Mark, collective_spans
from runner.gpt.tp_layers import TPState, all_reduce_kv_grads, all_reduce_sequence_parallel_grads
from runner.job.metrics import bubble_fraction_theory
from runner.job.schedule_ops import Key, lockstep_plan, schedule_ops, splits_backward

LOCKSTEP = ("interleaved-1f1b", "zb-h1")  # schedules whose messages travel in lockstep ticks


def stage_layers(n_layer: int, n_stages: int, stage: int) -> tuple[int, int]:
    """[first, last) layer ids of `stage` when n_layer splits evenly over n_stages."""
    if n_layer % n_stages:
        raise ValueError(f"n_layer {n_layer} does not split over {n_stages} stages")
    per = n_layer // n_stages
    return stage * per, (stage + 1) * per


def cut_chunks(model: GPT, n_stages: int, stage: int, v: int = 1) -> list[GPT]:
    """Rank `stage`'s v chunks of `model` (meta, tensor-parallel or not): chunk c is virtual stage c*p + stage.
    With v = 1 it is `model` itself cut to the stage. Otherwise each chunk is a shell sharing the model's
    modules (blocks, embedding, head) with containers of its own, so cutting one leaves the others whole."""
    total = n_stages * v
    if v > 1 and n_stages < 2:
        raise ValueError("interleaving needs at least 2 pipeline ranks")
    chunks = []
    for c in range(v):
        j = c * n_stages + stage
        chunk = model if v == 1 else _shell(model)
        first, last = stage_layers(model.config.n_layer, total, j)
        chunks.append(cut_stage(chunk, first, last, has_embed=j == 0, has_head=j == total - 1))
    return chunks


def _shell(model: GPT) -> GPT:
    shell = copy.copy(model)  # shares the submodules; the containers below are replaced, not shared
    shell._modules = dict(model._modules)
    shell.transformer = nn.ModuleDict(dict(model.transformer.items()))
    shell.transformer.h = nn.ModuleDict(dict(model.transformer.h.items()))
    return shell


class PipelineGPT(ParallelGPT):
    """One pipeline rank: `chunks` are its model chunks (one GPT cut to one virtual stage each, chunk c being
    virtual stage c*p + rank; a single GPT is one chunk); `output` turns the last stage's output into the
    loss and full logits. With one stage and one microbatch it is the whole model, tensor-parallel or not
    ('single', 'tensor'); with one microbatch it is the guide's layer split ('layer')."""

    def __init__(
        self, chunks: GPT | list[GPT], output: WholeVocabulary | TPState, mesh: Mesh, device: torch.device,
        dtype: torch.dtype, microbatches: int = 1, schedule: str = "1f1b", workload: str = "train",
    ):  # fmt: skip
        self.chunks = [chunks] if isinstance(chunks, GPT) else list(chunks)
        super().__init__(self.chunks[0].config, mesh, device, dtype)
        self.output = output
        self.stage_id, self.n_stages, self.v = mesh.coord.pp, mesh.pp_size, len(self.chunks)
        # Without a pipeline each microbatch's forward and backward run in turn, whatever the schedule's name:
        # gradient accumulation, one microbatch's activations at a time.
        self.n_micro, self.schedule, self.workload = microbatches, schedule if self.n_stages > 1 else "1f1b", workload
        self._shards: dict[str, nn.Parameter] = {}
        for chunk in self.chunks:
            self._shards.update(chunk.named_parameters(remove_duplicate=False))
        self._sp_params = [p for p in self.parameters() if getattr(p, "sequence_parallel", False)]
        self._kv_params = [p for p in self.parameters() if hasattr(p, "kv_replicated_from")]
        self._spans: list[dict] = []
        self.clock = mesh.stats.clock
        self.links = StageLinks(mesh.world, self.clock, self._span)
        self.max_inflight = 0
        self.peak_activation_bytes = 0
        self.microbatch_activation_bytes = 0
        self._param_storages: set[int] | None = None
        self.figure_sources: list = []  # objects with figures() -> dict that build.py attaches (checkpointing, precision)
        # One stage, one chunk: the last microbatch's backward is one pass that gives each gradient its last addition,
        # so data parallelism may reduce each one as that pass makes it (not under sequence parallelism or with
        # replicated key/value heads: some are summed over tp ranks afterwards). It arms its reductions from
        # `before_last_backward`, called just before that pass.
        self.last_backward_finishes_grads = (self.n_stages == 1 and self.v == 1 and not self._sp_params
                                             and not self._kv_params)  # fmt: skip
        self.before_last_backward: list[Callable[[], None]] = []

    @property
    def stage(self) -> GPT:
        """The rank's one chunk (schedules without interleaving; benchmarks read it)."""
        assert self.v == 1, "an interleaved rank holds several chunks: use .chunks"
        return self.chunks[0]

    # ---- where things are -------------------------------------------------------------------
    @property
    def n_virtual(self) -> int:
        return self.n_stages * self.v

    def virtual_stage(self, chunk: int) -> int:
        return chunk * self.n_stages + self.stage_id

    def rank_of_virtual(self, j: int) -> int:
        """Global rank holding virtual stage j (of this rank's tensor- and data-parallel column)."""
        return self.mesh.stage_rank(j % self.n_stages)

    # ---- what a chunk computes --------------------------------------------------------------
    def run_stage(
        self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0, last_only: bool = False, chunk: int = 0
    ) -> torch.Tensor:
        return self.chunks[chunk](x, cache=cache, start=start, last_only=last_only)

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.output.loss(out, targets)

    def next_token(self, out: torch.Tensor) -> torch.Tensor:
        return self.output.full_logits(out[:, -1:, :])[:, -1, :].argmax(dim=-1, keepdim=True)

    def tied_weight(self) -> nn.Parameter | None:
        """This rank's copy of the tied embedding / LM head weight, if it holds one (an untied head is the last
        stage's alone: nothing to sum)."""
        if not self.config.tie_head:
            return None
        if self.stage_id == 0:
            return self.chunks[0].transformer.wte.weight
        if self.stage_id == self.n_stages - 1:
            return self.chunks[-1].lm_head.weight
        return None

    def named_shards(self) -> dict[str, nn.Parameter]:
        return self._shards

    def shard_index(self, name: str):
        return shard_of(self._shards[name]).index

    @property
    def is_output_rank(self) -> bool:
        last = self.stage_id == self.n_stages - 1
        return last and (self.mesh.tp is None or self.mesh.tp.index == 0)

    # ---- bookkeeping ------------------------------------------------------------------------
    def begin_step(self, step: int, start: float) -> None:
        super().begin_step(step, start)
        self._spans = []

    def take_spans(self) -> list[dict]:
        self.clock.resolve()  # a no-op where the job has resolved the step already
        spans, self._spans = self._spans, []
        return spans + collective_spans(spans, self.mesh.stats.take_segments(), self.stage_id)

    def _span(self, stage: int, microbatch: int, phase: str, start: Mark, end: Mark) -> None:
        def sink(start_s: float, end_s: float) -> None:
            self._spans.append({"stage": stage, "microbatch": microbatch, "phase": phase,
                                "start": start_s, "end": end_s})  # fmt: skip

        self.clock.add(start, end, sink)

    def _begin_compute(self) -> Mark:
        """Start an operation: sends its receive did not carry (it had none) leave now; returns its start."""
        self.links.flush()
        return self.clock.mark()

    def _hidden_shape(self, mb: torch.Tensor) -> tuple[int, ...]:
        """What passes between stages for microbatch `mb`: under sequence parallelism each tp rank's seq/tp
        positions (the residual stream stays sharded from the embedding's reduce-scatter to the head's gather)."""
        seq = mb.shape[1]
        if getattr(self.output, "sequence_sharded", False):
            seq //= self.mesh.tp.size
        return (mb.shape[0], seq, self.config.n_embd)

    @contextmanager
    def _saving_into(self, storages: dict[int, int]) -> Iterator[None]:
        """Record, for every tensor autograd saves meanwhile, its storage and size in `storages` (by address).
        Parameters are skipped: they live anyway; what a microbatch in flight costs is its activations. They are
        known by storage identity, not address: ZeRO-3 frees a gathered block's storage and re-grows it at a
        new address each use, and its weights are saved as views (w.t()), so neither an address set nor an
        isinstance check would catch them."""
        if self._param_storages is None:  # parameters keep their storage object (optimizers update in place)
            self._param_storages = {q.untyped_storage()._cdata for q in self.parameters()}
        params = self._param_storages

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in params:
                storages.setdefault(storage.data_ptr(), storage.nbytes())
            # Detached, as autograd itself stores a saved output: the tensor as given still holds the node that
            # saves it, a cycle through C++ that Python's collector cannot see. A backward frees it; a graph kept
            # for a split backward's W (ZB-H1), whose W never runs the activation path's nodes, leaked every
            # step's saved tensors of those nodes. Autograd restores the node on unpack.
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def figures(self) -> dict:
        p, m = self.n_stages, self.n_micro
        out = {
            "microbatches": m,  # per replica: the pipeline's microbatches, or gradient accumulation's without one
            "max_inflight_microbatches": self.max_inflight,
            "peak_activation_bytes": self.peak_activation_bytes,
            "activation_bytes_per_microbatch": self.microbatch_activation_bytes,
        }
        if p > 1 and self.workload == "train":
            # Only where a pipeline trains: the idle share of each stage by theory, for this schedule
            # (runner/job/metrics.py bubble_fraction_theory states each formula's assumptions). The job
            # measures the real one.
            out["bubble_fraction_theory"] = bubble_fraction_theory(self.schedule, p, m, self.v)
        for source in self.figure_sources:
            out.update(source.figures())
        return out

    # ---- workloads --------------------------------------------------------------------------
    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        p, v, rank, last = self.n_stages, self.v, self.stage_id, self.n_virtual - 1
        mbs, tgts = idx.chunk(self.n_micro), targets.chunk(self.n_micro)
        split = splits_backward(self.schedule)
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        pending: dict[tuple[int, int], object] = {}  # what a split backward's W needs, by (chunk, microbatch)
        total_loss = torch.zeros((), device=self.device, dtype=torch.float32)
        saved: dict[tuple[int, int], int] = {}  # bytes autograd keeps for each chunk-microbatch in flight
        # Interleaved and ZB-H1 exchange their messages in lockstep ticks (runner/job/schedule_ops.py lockstep_plan; module
        # docstring); GPipe and 1F1B send with the next receive, which their order makes safe.
        plan = lockstep_plan(self.schedule, self.n_micro, p, v)[rank] if self.schedule in LOCKSTEP else None
        produced: dict[Key, torch.Tensor] = {}  # lockstep: outputs waiting for their tick
        posted: dict[Key, tuple[P2PBatch, torch.Tensor]] = {}  # lockstep: receives started, not yet used

        def send(t: torch.Tensor, key: Key, at: tuple[int, int]) -> None:
            if plan is None:
                self.links.send(t, self.rank_of_virtual(key[1]), at)
            else:
                produced[key] = t

        def receive(key: Key) -> torch.Tensor:
            at = key[1:]
            if plan is not None:
                batch, buf = posted.pop(key)
                self.links.wait(batch, at)
                return buf
            src = self.rank_of_virtual(key[1] - 1 if key[0] == "act" else key[1] + 1)
            return self.links.recv(self._hidden_shape(mbs[key[2]]), self.dtype, self.device, src, at)

        def exchange(tick: int) -> None:
            sends = [(produced.pop(key), self.mesh.stage_rank(dst)) for dst, key in plan.sends.get(tick, [])]
            keys = [key for _, key in plan.recvs.get(tick, [])]
            bufs = [torch.empty(self._hidden_shape(mbs[key[2]]), dtype=self.dtype, device=self.device) for key in keys]
            srcs = [self.mesh.stage_rank(src) for src, _ in plan.recvs.get(tick, [])]
            if plan.sends.get(tick):  # the timeline books the batch on the stage that sends, else the receiver
                kind, j, i = plan.sends[tick][0][1]
                at = (j - 1 if kind == "act" else j + 1, i)
            else:
                at = keys[0][1:]
            batch = self.links.post(sends, list(zip(bufs, srcs, strict=True)), at)
            posted.update((key, (batch, buf)) for key, buf in zip(keys, bufs, strict=True))

        def release(at: tuple[int, int]) -> None:
            del saved[at]  # its activations are freed: the last pass that needed them has run

        def forward(c: int, i: int) -> None:
            j = self.virtual_stage(c)
            x = mbs[i] if j == 0 else receive(("act", j, i)).requires_grad_(True)
            start = self._begin_compute()
            storages: dict[int, int] = {}
            with self._saving_into(storages):
                out = self.run_stage(x, chunk=c)
                if j == last:
                    # Each microbatch's mean loss over m microbatches: the gradients of the global mean.
                    out = self.loss(out, tgts[i]) / self.n_micro
            if j == last:
                total_loss.add_(out.detach().float())  # read once after the schedule, not per microbatch
            self._span(j, i, "forward", start, self.clock.mark())
            inputs[(c, i)], outputs[(c, i)] = x, out
            saved[(c, i)] = sum(storages.values())
            self.max_inflight = max(self.max_inflight, len(saved))
            self.microbatch_activation_bytes = max(self.microbatch_activation_bytes, saved[(c, i)])
            self.peak_activation_bytes = max(self.peak_activation_bytes, sum(saved.values()))
            if j < last:
                send(out.detach(), ("act", j + 1, i), (j, i))

        def backward(c: int, i: int) -> None:
            j = self.virtual_stage(c)
            out, x = outputs.pop((c, i)), inputs.pop((c, i))
            grad = None if j == last else receive(("grad", j, i))
            start = self._begin_compute()
            if not split:
                if i == self.n_micro - 1 and self.last_backward_finishes_grads:
                    for hook in self.before_last_backward:
                        hook()
                out.backward(grad)
                dx = x.grad
                release((c, i))
            elif j == 0:  # no input gradient to compute on the first stage: W runs the whole backward
                pending[(c, i)] = (out, grad)
                dx = None
            else:
                dx, pending[(c, i)] = input_grad_pass(out, grad, x, list(self.chunks[c].parameters()))
            self._span(j, i, "backward", start, self.clock.mark())
            if j > 0:
                send(dx, ("grad", j - 1, i), (j, i))

        def weight(c: int, i: int) -> None:
            j = self.virtual_stage(c)
            start = self._begin_compute()
            work = pending.pop((c, i))
            if j == 0:
                out, grad = work
                out.backward(grad)
            else:
                weight_grad_pass(work)
            del work
            self._span(j, i, "weight", start, self.clock.mark())
            release((c, i))

        run = {"F": forward, "B": backward, "W": weight}
        ops = plan.ops if plan is not None else schedule_ops(self.schedule, self.n_micro, p, rank, v)
        for k, op in enumerate(ops):
            for tick in plan.ticks_before[k] if plan is not None else ():
                exchange(tick)
            run[op.kind](op.chunk, op.microbatch)
        for tick in plan.ticks_after if plan is not None else ():
            exchange(tick)
        self.links.finish()
        self.sync_tied_embedding()
        if self._sp_params:
            all_reduce_sequence_parallel_grads(self._sp_params, self.mesh.tp)
        if self._kv_params:
            all_reduce_kv_grads(self._kv_params, self.mesh.kv)
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
        last, outs = self.n_virtual - 1, []
        for i, mb in enumerate(idx.chunk(self.n_micro)):
            for c in range(self.v):  # each microbatch through this rank's chunks in turn
                j = self.virtual_stage(c)
                x = mb
                if j > 0:
                    x = self.links.recv(self._hidden_shape(mb), self.dtype, self.device, self.rank_of_virtual(j - 1),
                                        (j, i))  # fmt: skip
                start = self._begin_compute()
                out = self.run_stage(x, chunk=c)
                self._span(j, i, "forward", start, self.clock.mark())
                if j < last:
                    self.links.send(out, self.rank_of_virtual(j + 1), (j, i))
                else:
                    outs.append(self.output.full_logits(out))  # under tensor parallelism every tp rank gathers
        self.links.finish()
        return torch.cat(outs) if self.is_output_rank else None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        mbs = idx.chunk(self.n_micro)
        caches = [KVCache.empty(self.config.n_layer) for _ in mbs]  # indexed by layer id: one for all chunks
        last = self.n_virtual - 1
        first_rank, last_rank = self.rank_of_virtual(0), self.rank_of_virtual(last)

        def step(i: int, tokens: torch.Tensor, pos: int, round_: int) -> torch.Tensor | None:
            rows, nxt = mbs[i].shape[0], None
            for c in range(self.v):
                j = self.virtual_stage(c)
                if j > 0:
                    x = self.links.recv((rows, tokens.shape[1], self.config.n_embd), self.dtype, self.device,
                                        self.rank_of_virtual(j - 1), (j, i))  # fmt: skip
                elif round_ > 0 and last > 0:  # the token the last stage picked one round ago
                    x = self.links.recv((rows, 1), torch.long, self.device, last_rank, (j, i), comm=self.mesh.embed)
                else:
                    x = tokens
                start = self._begin_compute()
                out = self.run_stage(x, cache=caches[i], start=pos, last_only=True, chunk=c)
                self._span(j, i, "forward", start, self.clock.mark())
                if j < last:
                    self.links.send(out, self.rank_of_virtual(j + 1), (j, i))
                    continue
                nxt = self.next_token(out)
                if last > 0 and round_ + 1 < new_tokens:
                    self.links.send(nxt, first_rank, (j, i), comm=self.mesh.embed)
            return nxt

        with self.output.whole_sequences():  # one position a pass: nothing to split over the sequence
            out = greedy_generate(list(mbs), new_tokens, step)
        self.links.finish()
        return torch.cat(out) if self.is_output_rank else None
