"""ZeRO (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", SC 2020)
over the data-parallel group: stage 1 shards the optimizer state, 2 also the gradients, 3 also the parameters.

Owns `ZeroShards`, which `DataParallelGPT(inner, mesh, zero_stage=k)` (runner/gpt/data_parallel.py) uses in
place of its all-reduce buckets for k > 0, and the two asynchronous counted collectives it needs.

Layout: runner/gpt/zero_units.py (units, pieces, what verification reads).

Stage 3 keeps only the shard; a unit's flat buffer exists while it is in use: its storage is allocated
and all-gathered before the block runs (forward pre-hook; the next block's all-gather is started at the
same time: prefetch), released after it (forward hook), gathered again when its output's gradient
arrives (a tensor hook: just before the block's backward; the block before it prefetched), and
released once every parameter of the unit has its gradient (post-accumulate-grad hooks), which is when
its gradients are flattened, reduce-scattered, and the full gradients dropped. The outer unit stays
gathered from the start to the end of a workload (FSDP's root unit does the same): the tied weight is
used at both ends. Releasing is `untyped_storage().resize_(0)` on the flat buffer, as FSDP1 does: the
parameters stay the same objects (their Shard records, hooks and the tensors autograd saved keep
pointing at the same storage), and a later all-gather into the re-grown storage gives them back the same
values. A block run again during backward (activation checkpointing) is gathered but not released there.
Parameters the builder left on the meta device get their values here, one parameter at a time through
`materialize` under its reference name, so a stage-3 rank never holds more than one unit of the model
(built the other way, the rank first materializes its whole part and then shards it).

Overlap. When the inner strategy's last microbatch runs one backward pass that gives each gradient its last
addition (the whole model, 'data', with or without gradient accumulation), a unit's reduction starts from its
last post-accumulate-grad hook of that pass and runs while backward continues, as the plain data-parallel
buckets do; the earlier microbatches' backwards only accumulate whole gradients (one reduction a step). Inside a pipeline ('3d' with microbatches) a gradient
is accumulated once per microbatch, so the reductions start after the inner backward (all of a stage's
gradients then exist at once, in stage 2 and 3 too: the at-rest figures are sharded, the peak of the step
is not). Stage 3 in a pipeline gathers each block for each microbatch's forward and backward: 2m
all-gathers a block a step, which is why DeepSpeed refuses ZeRO-2/3 with pipeline parallelism; here it
works and its communication shows in the counters.

Why our own implementation rather than PyTorch's FSDP2 `fully_shard` with counting around it:
- every byte goes through our counted GroupComm bookkeeping (runner/gpt/comm.py conventions: all_gather
  payload = the gathered buffer, reduce_scatter payload = the full input), so a ZeRO run's per-rank
  communication sits beside every other strategy's in the same figures; FSDP2 issues its collectives
  inside DTensor and its own streams, where only a debug mode (CommDebugMode) could count them;
- the data-parallel dimension composes with our tensor-parallel layers (plain Parameters carrying Shard
  records) and our pipeline engine; FSDP2 wants DTensor parameters on a DeviceMesh, which our
  tensor parallelism does not produce;
- it runs on gloo with CPU ranks as on NCCL: gloo in the installed torch has reduce_scatter_tensor and
  all_gather_into_tensor (checked: both, asynchronous too, and the in-place all-gather whose input is the
  output's own slice), so no emulation is needed;
- per-rank bytes are ours to state exactly (the table above), which the tests check against the paper.
bench/bench_zero.py measures what this costs against FSDP2 on the same model.

CUDA: collectives run on NCCL's stream; `work.wait()` makes the compute stream wait for them, never the
host. Buffers are allocated (storage re-grown) on the compute stream before the collective is issued and
NCCL's stream waits for the compute stream at issue, so a block freed earlier on the compute stream is not
written early. A reduce-scatter's input and an all-gather's output stay referenced until waited for, so
the caching allocator cannot hand their memory to another kernel while NCCL still uses it; a unit is
released only after its pending all-gather was waited for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from runner.gpt.comm import GroupComm, PendingCollective, nbytes
from runner.gpt.model import shard_of
from runner.gpt.precision import adamw
from runner.gpt.zero_units import (
    Unit,
    block_modules,
    flat_piece_index,
    group_parameters,
    make_unit,
    materialized_value,
    rank_pieces,
)

# The current names, with a fallback for releases that only have the older ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _counted_async(comm: GroupComm, kind: str, payload: int, start_fn, keep: torch.Tensor) -> PendingCollective:
    """Start an asynchronous collective, counted like GroupComm.all_reduce_async: bytes now, time when waited."""
    stats = comm.stats
    start = stats.clock.mark() if stats.counting else None
    work = start_fn()
    if stats.counting:
        stats.time(start, stats.clock.mark())
        stats.record(kind, payload, comm.size)
    return PendingCollective(work, keep, stats, kind)


def all_gather_async(comm: GroupComm, out: torch.Tensor, shard: torch.Tensor) -> PendingCollective:
    """out (group size x shard.numel(), flat) = every rank's shard in group order; payload = out's bytes."""
    fn = lambda: _all_gather_single(out, shard, group=comm.group, async_op=True)  # noqa: E731
    return _counted_async(comm, "all_gather", nbytes(out), fn, out)


def reduce_scatter_async(
    comm: GroupComm, out: torch.Tensor, flat: torch.Tensor
) -> tuple[PendingCollective, torch.Tensor]:
    """out = this rank's chunk of the sum of every rank's flat; payload = flat's bytes. Returns the pending
    collective and flat, which the caller keeps until waiting (NCCL still reads it)."""
    fn = lambda: _reduce_scatter_single(out, flat, group=comm.group, async_op=True)  # noqa: E731
    return _counted_async(comm, "reduce_scatter", nbytes(flat), fn, out), flat


class ZeroShards:
    """ZeRO stage 1, 2 or 3 over `comm` (the data-parallel group) for the parameters of `inner`
    (a ParallelGPT whose named_shards() are its parameters under reference names)."""

    def __init__(self, inner, comm: GroupComm, stage: int, overlap: bool, seed: int | None = None,
                 reduce_dtype: torch.dtype | None = None):  # fmt: skip
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
        self.inner, self.comm, self.stage, self.overlap, self.seed = inner, comm, stage, overlap, seed
        self.reduce_dtype = reduce_dtype  # the gradients' dtype on the wire when not their own (reduce_fp32)
        self.n, self.r = comm.size, comm.index
        named = inner.named_shards()
        groups, self._name_of = group_parameters(named)  # _name_of: a reference name of each parameter
        blocks = sorted((k for k in groups if k != "outer"), key=lambda k: int(k.rsplit(".", 1)[1]))
        modules = block_modules(inner)
        self.blocks = [self._make_unit(k, groups[k], modules.get(k)) for k in blocks]
        self.outer = self._make_unit("outer", groups["outer"], None) if "outer" in groups else None
        self.units = ([self.outer] if self.outer else []) + self.blocks
        self._unit_of = {id(p): u for u in self.units for p in u.params}
        self.pieces = rank_pieces(named, self._unit_of, self.r)
        # Stages 1, 2: gather from the shards before the first use, so whatever was written into them after
        # building (a checkpoint's slices, a test's fault) reaches every rank's whole parameters.
        self._fresh = False
        self._training = False  # inside a forward_backward: gradient hooks act only then
        self._armed = False  # the last microbatch's backward runs: a unit's gradients are final once made
        self.grad_bytes = 0
        self.reduce_inputs_peak = 0  # most whole-unit gradient buffers awaiting their reduce-scatter at once
        for u in self.units:
            for p in u.params:
                p.register_post_accumulate_grad_hook(lambda p: self._grad_ready(p))
        if stage == 3:
            for i, u in enumerate(self.blocks):
                if u.module is None:
                    raise ValueError(f"ZeRO-3: no module found for {u.name}")
                u.module.register_forward_pre_hook(lambda _m, _a, i=i: self._before_block(i))
                u.module.register_forward_hook(lambda _m, _a, out, i=i: self._after_block(i, out))

    # ---- layout (runner/gpt/zero_units.py) --------------------------------------------------------
    def _make_unit(self, name: str, params: list[nn.Parameter], module: nn.Module | None) -> Unit:
        unit = make_unit(name, params, module, n=self.n, r=self.r, shard_only=self.stage == 3,
                         dtype=self.inner.dtype, device=self.inner.device,
                         initial_value=lambda p: materialized_value(self._name_of[id(p)], p, self.seed, self.inner))  # fmt: skip
        self._release(unit)  # stage 3: from now on the whole unit exists only while in use
        return unit

    # ---- what the rank holds ---------------------------------------------------------------------
    def shards(self) -> list[nn.Parameter]:
        return [u.shard for u in self.units]

    def parameters(self) -> list[nn.Parameter]:
        """What the rank holds between steps: whole parameters (stages 1, 2) or its shards (stage 3)."""
        return self.shards() if self.stage == 3 else self.inner.parameters()

    def named_shards(self) -> dict[str, nn.Parameter]:
        if self.stage == 1:
            return self.inner.named_shards()
        out = {}
        for name, piece in self.pieces.items():
            shard = piece.unit.shard
            view = nn.Parameter(shard.detach()[piece.at : piece.at + piece.hi - piece.lo], requires_grad=False)
            if shard.grad is not None:
                view.grad = shard.grad[piece.at : piece.at + piece.hi - piece.lo]
            out[name] = view
        return out

    def shard_index(self, name: str):
        if self.stage == 1:
            return self.inner.shard_index(name)
        piece = self.pieces[name]
        return flat_piece_index(shard_of(piece.param), piece.lo, piece.hi)

    def zero_grad(self) -> None:
        for u in self.units:
            u.shard.grad = None
            for p in u.params:
                p.grad = None

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW over this rank's shards only: its state is 2 x sum S_u elements (and one step counter a unit), and
        under bf16-master the float32 masters of the shards too (the paper's P_os)."""
        return adamw(self.shards(), lr, self.inner.master_dtype)

    @torch.no_grad()
    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        if self.stage < 3:  # refresh every rank's whole parameters from the updated shards
            self._gather_all()
        self._fresh = True

    def figures(self) -> dict:
        return {
            "zero_stage": self.stage,
            "grad_bytes": self.grad_bytes,
            "zero_units": len(self.units),
            "zero_flat_padding_elements": sum(u.padded - u.numel for u in self.units),
            "zero_reduce_buffers_peak": self.reduce_inputs_peak,
        }

    # ---- workloads ---------------------------------------------------------------------------------
    @contextmanager
    def workload(self, train: bool) -> Iterator[None]:
        """Around one forward_logits / generate / forward_backward of the inner strategy."""
        if self.stage < 3 and not self._fresh:
            self._gather_all()
        self._fresh = True
        self._training = train
        if train:
            self.zero_grad()  # each forward_backward computes fresh gradients
            for u in self.units:
                u.grads_missing = len(u.params)
        if self.stage == 3 and self.outer is not None:
            self._gather(self.outer, wait=True)
        try:
            yield
            if train:
                self._finish_gradients()
        finally:
            self._training = self._armed = False
            for u in self.units:
                u.awaiting_weight_grads = 0
                self._release(u)  # stage 3 only

    def _gather_all(self) -> None:
        """Stages 1, 2: every unit's full buffer from the ranks' shards (in place: a shard is its own slice)."""
        pending = [all_gather_async(self.comm, u.full, u.shard.detach()) for u in self.units]
        for work in pending:
            work.wait()

    # ---- stage 3: gather before use, release after -------------------------------------------------
    def _gather(self, u: Unit, wait: bool) -> None:
        if not u.gathered and u.pending_gather is None:
            storage = u.full.untyped_storage()
            storage.resize_(u.padded * u.full.element_size())
            u.pending_gather = all_gather_async(self.comm, u.full, u.shard.detach())
        if wait and u.pending_gather is not None:
            u.pending_gather.wait()
            u.pending_gather = None
            u.gathered = True

    def _release(self, u: Unit) -> None:
        if self.stage < 3:
            return
        if u.pending_gather is not None:  # never free memory a collective still writes
            u.pending_gather.wait()
            u.pending_gather = None
        u.full.untyped_storage().resize_(0)
        u.gathered = False

    def _before_block(self, i: int) -> None:
        self._gather(self.blocks[i], wait=True)
        if i + 1 < len(self.blocks) and not _in_backward():
            self._gather(self.blocks[i + 1], wait=False)  # prefetch: runs while this block computes

    def _after_block(self, i: int, out) -> None:
        if _in_backward():
            return  # recomputed for backward (checkpointing): its backward follows, keep it
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g, i=i: self._before_block_backward(i, g))
        if not self.blocks[i].awaiting_weight_grads:
            self._release(self.blocks[i])

    def _before_block_backward(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        self._gather(self.blocks[i], wait=True)
        self.blocks[i].awaiting_weight_grads += 1
        if i > 0:
            self._gather(self.blocks[i - 1], wait=False)
        return grad

    # ---- gradients -----------------------------------------------------------------------------------
    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self._training:
            return
        u = self._unit_of[id(p)]
        u.grads_missing -= 1
        if u.grads_missing:
            return
        u.grads_missing = len(u.params)  # the next microbatch's backward counts again
        u.awaiting_weight_grads = max(0, u.awaiting_weight_grads - 1)
        if self.stage == 3 and u is not self.outer and not u.awaiting_weight_grads:
            self._release(u)
        if self.overlap and self._armed:
            self._start_reduce(u)

    def arm(self) -> None:
        """Just before the last microbatch's backward (the engine's `before_last_backward`): from now on a unit whose
        gradients are all made is reduced while backward goes on; earlier microbatches only accumulate."""
        self._armed = self._training

    @torch.no_grad()
    def _start_reduce(self, u: Unit) -> None:
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in u.params]
        pad = u.padded - u.numel
        if pad:
            parts.append(torch.zeros(pad, dtype=u.full.dtype, device=u.full.device))
        flat = torch.cat(parts)
        if self.reduce_dtype is not None:
            flat = flat.to(self.reduce_dtype)
        if self.stage == 1:  # the reduced flat buffer becomes the gradients: nothing extra to bound
            u.pending_reduce = self.comm.all_reduce_async(flat)
            return
        for p in u.params:
            p.grad = None  # only the shard's slice of the gradient is kept (stages 2, 3)
        # At most one reduce-scatter in flight, as FSDP2 does: each holds a whole unit's flat gradient
        # until it completes, so letting them pile up during backward would bring back the full
        # gradients' memory that stage 2 removes. The previous one had this unit's backward to finish.
        for other in self.units:
            if other.pending_reduce is not None:
                self._complete_reduce(other)
        out = torch.empty(u.shard_numel, dtype=flat.dtype, device=flat.device)
        u.pending_reduce, u.reduce_input = reduce_scatter_async(self.comm, out, flat)
        self.reduce_inputs_peak = max(self.reduce_inputs_peak, sum(v.reduce_input is not None for v in self.units))

    @torch.no_grad()
    def _complete_reduce(self, u: Unit) -> None:
        reduced = u.pending_reduce.wait()
        u.pending_reduce, u.reduce_input = None, None
        reduced /= self.n  # the mean over replicas, as plain data parallelism
        reduced = reduced.to(u.full.dtype)  # back in the gradients' dtype (reduced wider: reduce_dtype)
        if self.stage == 1:
            for p, off in zip(u.params, u.offsets, strict=True):
                p.grad = reduced[off : off + p.numel()].view_as(p)
            u.shard.grad = reduced[self.r * u.shard_numel : (self.r + 1) * u.shard_numel]
        else:
            u.shard.grad = reduced

    @torch.no_grad()
    def _finish_gradients(self) -> None:
        """Reduce what backward did not start (all of it inside a pipeline), then complete every reduction."""
        for u in self.units:
            if u.pending_reduce is None and u.shard.grad is None:
                self._start_reduce(u)
        for u in self.units:
            if u.pending_reduce is not None:
                self._complete_reduce(u)
        held = {}
        for u in self.units:  # stage 1's shard gradient is a view of its unit's: count storages once
            g = u.shard.grad
            held[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
        self.grad_bytes = sum(held.values())


def _in_backward() -> bool:
    """True while autograd's engine runs a backward on this thread (a block recomputed for it)."""
    return torch._C._current_graph_task_id() != -1
