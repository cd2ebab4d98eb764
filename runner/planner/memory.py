"""The peak bytes of a rank of a tp x pp x dp (x ZeRO) layout: the lab's one memory model (torch-free).

`rank_memory` / `layout_memory` add up what each part weighs (runner/planner/byte_counts.py: parameters,
gradients, AdamW state, activations) at every moment of a step, replaying the rank's schedule
(`backward_points`), and take the largest: the peak, and the moment it falls on. runner/spec/estimates.py (the
Launch page's estimate and the CPU memory check) and the planner's layouts call it. Its inputs -- presets,
`Layout`, `Workload` -- are runner/planner/models.py.

Microbatches in flight on pipeline rank r of p, m microbatches (runner/gpt/schedules.py):
- GPipe: m;
- 1F1B: min(p - r, m);
- ZB-H1: min(p, m) on every rank (Qi et al. 2023: 1F1B's peak of p; our schedule runs rank r's W passes r
  microbatches behind its B passes and a microbatch's activations live until its W);
- interleaved 1F1B: min(2(p - r - 1) + (v - 1)p + 1, v*m) chunk-microbatches of L/(p*v) layers each
  (Megatron's warm-up count + the one in its steady state; Korthikanti eq. 5: L(1 + (p-1)/(p*v)) layers' worth
  on rank 0).
The last virtual stage also keeps, per microbatch, the final norm's input (residual width; RMSNorm's normalized
input too), the head's
input (compute width) and cross entropy's float32 log-softmax (b*s*V_pad/t). Int64 token ids and targets and the
LayerNorms' statistics (O(b*s), not O(b*s*h)) are left out.

The peak (`RankMemory.total`, what must fit). zero_grad(set_to_none=True) frees the gradients at each step's
start, so they are not there while the first microbatches' activations pile up. The peak therefore falls inside
some backward pass -- activations only grow by forwards, each followed by a backward that finds at least as much
held -- or in AdamW's step. `backward_points` replays the rank's schedule (runner/job/schedule_ops.py, the lists the
engine runs) and for each backward pass counts what is held when it starts: the parameters and AdamW's moments;
the activations of the chunk-microbatches held (an interleaved rank's chunks differ, only one holding the head, so
it is the chunks held, not a count times an average chunk), and on a chunk that is not the last virtual stage each
one's output, which the engine keeps to start its backward from (s*b*h at the residual width); the gradients only
if an earlier pass made them; ZB-H1's records (below). To that it adds the largest of the pass's moments, which
follow one another:
- on the head's chunk, cross entropy's backward: the loss's gradient beside the log-softmax, then the logits'
  gradient -- two b*s*V_pad/t float32 tensors beyond the saved one (tensor parallel: its forward's shifted logits
  and their exponentials, its backward's two copies; under bf16-mixed the bfloat16 logits as well); then the
  head's matmul: the logits' gradient, the head input's gradient and the head weight's fresh gradient;
- a block's backward start, which begins with the MLP's c_proj: the residual stream's gradient arriving (s*b*h;
  gathered from its sequence shards under sequence parallelism), c_proj's input gradient (s*b*4h/t) and its
  weight's fresh gradient -- autograd computes a weight's gradient into a new tensor that becomes .grad or is
  added to it (in bfloat16 under bf16-mixed, then cast); the head's saved tensors are gone by then. Without a
  pipeline the head's weight is the embedding's, and the head's gradient waits in autograd's input buffer for the
  embedding's through all the blocks. Under sequence parallelism c_fc's backward that follows is the larger at high
  tp: its input gathered whole again and the input's whole gradient, beside its output's gradient. Beside it,
  ZeRO-3's gathered blocks (the one running and the prefetched one; over gloo a third, the buffer gloo all-gathers
  into before copying) and a checkpointed block's recompute;
- a first pass's last block: the blocks above it freed their activations and made their gradients (the larger
  where a block's parameters outweigh its activations, small microbatches of wide models);
- the first virtual stage's end, the embeddings' backward: the pass's own microbatch freed, the gradients made,
  the embeddings' fresh gradients (without a pipeline the tied one beside the head's that waited for it and their
  sum, which autograd adds out of place: three), and under ZeRO-1 without a pipeline every block's gradients
  flattened into its unit for the all-reduce;
- ZeRO-2/3 without a pipeline, while a unit is reduce-scattered: its gradients, their flattened copy and the
  previous unit's in flight, which gloo copies (three of the largest block unit's, four over gloo, less the block
  activations its backward freed), and at the pass's end the outer unit's (embeddings, final norm, head: the
  largest with a big vocabulary or an untied head): two of it, three over gloo, with no activations left; ZeRO-2/3 in a pipeline: the stage's
  full gradients, until the reductions after the pipeline's backward;
- a split backward's W: one weight's fresh gradient at a time; ZB-H1 holds what B recorded for each microbatch
  still awaiting its W (the gradient at every weight's branch point, runner/gpt/schedules.py: 7h/t + 4h values a
  token a layer, and the logits' on the head's chunk, where B's end frees cross entropy's saved log-softmax: W
  never runs those nodes, and the loss that held them is dropped).
Data parallelism and ZeRO-1 add the backward's end: the gradients flattened into the all-reduce buffers (buckets,
ZeRO-1's units) beside the parameters' own, twice the gradients and no activations left.
So GPipe's first stage peaks in its second backward (m - 1 microbatches and the gradients) or its first (m, none),
whichever is larger, and a single rank in its first backward with no gradient yet.
AdamW's step (`optimizer_step_bytes`) runs after the backward has freed the activations (under bf16-master with
the float32 gradients of the masters it steps, runner/gpt/precision.py MasterAdamW): the gradients plus
torch's foreach AdamW's one temporary the size of everything it steps (its default on GPUs: the square roots of
the second moments; the rank's shards under ZeRO), or its for-loop AdamW's two of the largest tensor's size (the
default on CPUs: that square root and the quotient).
What is not modelled: the gradients of activations beyond a block's first moment, allocator rounding and
fragmentation, buffers gloo keeps after a tensor-parallel collective, and the process's own memory (a CUDA context,
on a CPU the interpreter). Runs
measure the same thing (runner/job/resources.py `peak_tensor_bytes`: the allocator's peak on CUDA without the cuBLAS
workspaces, which belong with the CUDA context in Devices.reserve_bytes and are reported beside it; the
profiler's count of CPU allocations on a CPU), and tests/test_planner_measured.py holds a training step's peak
to 10% of it on tiny and small runs of every strategy.
Forward and generate: runner/planner/inference_memory.py.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

from runner.gpt.config import GPTConfig
from runner.job.schedule_ops import schedule_ops, splits_backward
from runner.planner.byte_counts import (
    block_tensors,
    checkpointed_layer_bytes,
    embedding_parameters,
    largest_block_tensor,
    largest_tensor,
    layer_bytes,
    rank_parameters,
    tp_widths,
    unit_shard,
)
from runner.planner.inference_memory import inference_bytes
from runner.planner.models import ADAM_STEP_BYTES, LOGIT_BYTES, Layout, Workload, padded_vocab


def in_flight(schedule: str, pp: int, m: int, stage: int, v: int = 1) -> float:
    """Microbatches whose activations pipeline rank `stage` holds at its peak, in units of the rank's whole
    share of layers (an interleaved chunk-microbatch counts 1/v)."""
    if pp <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved-1f1b":
        chunks = min(2 * (pp - stage - 1) + (v - 1) * pp + 1, v * m)
        return chunks / v
    if schedule == "zb-h1":  # rank r runs its W passes r microbatches behind its B: (p - r) + r held until W
        return float(min(pp, m))
    return float(min(pp - stage, m))  # 1f1b


@dataclass(frozen=True)
class BackwardPoint:
    """A moment a rank's peak can fall on: the start of one of its backward passes. Activations only grow by
    forwards and each forward is followed, sooner or later, by a backward that finds at least as much held."""

    held: tuple[int, ...]  # chunk-microbatches whose activations the rank holds, per local chunk
    awaiting_w: tuple[int, ...]  # of those, the ones whose B ran and W has not (split backward only)
    grads: bool  # an earlier pass made the gradients (zero_grad(set_to_none=True) drops them at each step's start)
    chunk: int  # the local chunk the pass runs
    kind: str  # "B" (a whole backward, or a split one's input pass) or "W" (a split backward's weight pass)


@functools.lru_cache(maxsize=1024)
def backward_points(schedule: str, pp: int, m: int, stage: int, v: int) -> tuple[BackwardPoint, ...]:
    """The start of every backward pass of pipeline rank `stage`, replaying the schedule the engine runs
    (runner/job/schedule_ops.py; without a pipeline, pp = 1: each microbatch's forward and backward in turn). A
    forward saves, the backward frees (a split backward's W frees; on the first virtual stage, which has no input
    gradient, W runs the whole backward and its B nothing). Gradients exist from the end of the first pass that
    makes them."""
    # Without a pipeline the engine runs each microbatch's forward and backward in turn (gradient accumulation)
    schedule = schedule if pp > 1 else "1f1b"
    held, awaiting = [0] * v, [0] * v
    grads = False
    split = splits_backward(schedule)
    points: dict[BackwardPoint, None] = {}
    for op in schedule_ops(schedule, m, pp, stage, v):
        c = op.chunk
        if op.kind == "F":
            held[c] += 1
            continue
        first = c * pp + stage == 0
        if split and op.kind == "B" and first:
            continue
        points[BackwardPoint(tuple(held), tuple(awaiting), grads, c, op.kind)] = None
        if split and op.kind == "B":
            awaiting[c] += 1
            continue
        if split and not first:
            awaiting[c] -= 1
        held[c] -= 1
        grads = True
    return tuple(points)


# ---- the rank's memory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankMemory:
    """Predicted bytes of one rank (pipeline stage `stage`); `total` is what must fit on the device."""

    stage: int
    param_count: int  # parameters held between steps (shards under ZeRO-3)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    transient_bytes: int  # at the peak, during a step only: gathered ZeRO-3 units, W's records, logits, recompute
    microbatch_size: int
    in_flight: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    optimizer_step_bytes: int = 0  # AdamW's temporaries while it steps, after the backward freed the activations
    peak_bytes: int = 0  # the most the rank holds at once in a step (module docstring: "The peak")
    peak_at: str = ""  # the moment it holds it, in words

    @property
    def states_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total(self) -> int:
        """What must fit on the device: the step's peak (module docstring)."""
        return self.peak_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes), "total": self.total}


def rank_memory(cfg: GPTConfig, layout: Layout, work: Workload, stage: int) -> RankMemory:
    """Bytes on one rank of pipeline stage `stage` (any tp and dp coordinate: they hold the same)."""
    tp, pp, dp, zero = layout.tp, layout.pp, layout.dp, layout.zero_stage
    v = work.chunks_for(layout)
    sp = rank_parameters(cfg, layout, stage, v, work.tp_style)
    w = work.param_width
    train = work.workload == "train"
    psi = sp.total
    n_tensors = sp.outer_tensors + block_tensors(cfg) * len(sp.layers)
    units = [sp.block] * len(sp.layers) + ([sp.outer] if sp.outer else [])
    shards = [unit_shard(u, dp) for u in units]
    sharded = sum(shards)
    largest = largest_tensor(cfg, layout, stage, work.tp_style)
    notes: list[str] = []
    zero = zero if dp > 1 else 0
    params = sharded if zero == 3 else psi
    grads = 0
    optimizer = 0
    step_bytes = 0
    always = 0  # transient bytes at every moment of a step
    full_grads = 0  # bytes a rank's gradients take beyond their resting size while its backward passes run
    if train:
        # AdamW steps over the rank's parameters, or under ZeRO over its shard of each unit; its moments are as wide as
        # what it steps (bf16-master: float32 masters, kept beside the moments, with float32 gradients during the step)
        stepped = sharded if zero >= 1 else psi
        ow, master = work.moment_width, work.master_width
        if work.adamw == "foreach":
            step_bytes = stepped * ow
        else:
            step_bytes = 2 * (max(shards) if zero >= 1 else largest) * ow
        step_bytes += stepped * master
        grads = sharded if zero >= 2 else psi
        optimizer = (2 * ow + master) * stepped + ADAM_STEP_BYTES * (len(units) if zero >= 1 else n_tensors)
        if zero >= 2 and (pp > 1 or work.microbatches_for(layout) > 1):
            # inside a pipeline, or accumulating microbatches, the stage's full gradients exist before reducing
            full_grads = (psi - sharded) * w
            notes.append("ZeRO-2/3 with microbatches: the full gradients exist until the reduce-scatter")
    in_blocks = 0  # transient bytes while a block runs (not during the head's cross entropy)
    if zero == 3:
        # gathered during a step: the outer unit throughout (runner/gpt/zero.py), and while a block runs, that block and
        # the prefetched next one
        always += sp.outer * w
        in_blocks += min(2, len(sp.layers)) * sp.block * w
        if work.backend == "gloo" and len(sp.layers) > 1:
            in_blocks += sp.block * w  # gloo all-gathers the prefetched block into a buffer of its own, then copies
    m = work.microbatches_for(layout)
    rows = max(1, work.batch // dp)
    mb = max(1, rows // m) if work.workload == "train" else rows
    s, h = work.seq, cfg.n_embd
    flight = in_flight(work.schedule, pp, m, stage, v) if train else 1.0
    activations = 0
    transient = always
    kv = 0
    if train:
        every = work.checkpoint_every
        full = layer_bytes(work, s, mb, cfg, tp)
        residual, compute = work.residual_width, work.activation_width
        ckpt = checkpointed_layer_bytes(s, mb, h, tp, work.sequence_parallel) * residual / 2
        split = tp if tp > 1 and work.sequence_parallel else 1
        tokens = s * mb
        vocab_rows = padded_vocab(cfg.vocab_size, tp) // tp
        logits = tokens * vocab_rows * LOGIT_BYTES
        # The last virtual stage's head: the final LayerNorm's input (residual width), the head's input (its
        # output, at the compute width) and cross entropy's float32 log-softmax.
        final_norm = 2 if cfg.is_llama else 1  # RMSNorm keeps its normalized input beside the input
        head = (final_norm * residual + compute) * tokens * h // split + logits
        # What a split backward's B records for its W, per microbatch (runner/gpt/schedules.py): the gradient
        # arriving at each weight's branch point -- the outputs of c_attn (3h/t), attention's c_proj (h), c_fc (4h/t),
        # the MLP's c_proj (h) and the two LayerNorms (h each) -- and on the head's chunk the logits' and the final
        # LayerNorm's.
        whole = 4 / tp if work.sequence_parallel else 4
        q, kv_rows, f = tp_widths(cfg, tp)
        recorded_layer = tokens * (q + 2 * kv_rows + cfg.fused_mlp_parts * f + h * whole) * compute
        recorded_head = tokens * vocab_rows * compute + tokens * h // split * compute
        bf16_mixed = work.dtype == "bf16-mixed"
        head_matmul = sp.matmul - sp.block_matmul * len(sp.layers)  # the head's (tied) weight on the last stage
        # A weight's gradient is computed into a fresh tensor that becomes its .grad or is added to it (bfloat16
        # under bf16-mixed, then cast to the float32 parameter's dtype).
        grad_width = w + (2 if bf16_mixed else 0)
        fresh_block = largest_block_tensor(cfg, tp, work.tp_style) * grad_width
        fresh_vocab = vocab_rows * h * grad_width
        # A block's backward begins with the MLP's c_proj: the residual stream's incoming gradient (gathered from its
        # sequence shards under sequence parallelism), c_proj's input gradient and its weight's fresh gradient.
        flow = tokens * h * residual // split + (tokens * h * compute if split > 1 else 0)
        flow += tokens * cfg.d_ff // tp * compute
        if split > 1:
            # Under sequence parallelism c_fc's backward (runner/gpt/tp_layers.py _SequenceGatheredLinear) gathers its
            # input whole again (the shards and their concatenation), then computes the input's gradient whole, at the
            # input's width, and reduce-scatters it (from contiguous copies of its sequence chunks), beside its
            # output's gradient (gate and up for SwiGLU): two whole b*s*h tensors, the larger moment at high tp.
            column = tokens * h * residual // split + 2 * tokens * h * residual
            flow = max(flow, column + tokens * cfg.fused_mlp_parts * cfg.d_ff // tp * compute)
        kept = tokens * h * residual // split  # a chunk's output, kept by the engine for its backward (pipeline.py)
        # Without a pipeline a tied head's weight is the embedding's: its gradient waits in autograd's input buffer for
        # the embedding's, through the whole backward of the blocks, and the two are summed at the end.
        tied = pp == 1 and cfg.tie_head
        # ZeRO-2/3 without a pipeline reduce-scatters each unit's gradients as its backward ends and drops them
        scattered = zero >= 2 and pp == 1
        flattens_blocks = dp > 1 and zero == 1 and pp == 1  # and all-reduces them as the backward goes (zero.py)
        per_chunk, held_out, recorded, heads, n_layers, chunk_grads = [], [], [], [], [], []
        n_ckpt = 0
        for c in range(v):
            layers = sp.layers[c * len(sp.layers) // v : (c + 1) * len(sp.layers) // v]
            ckpts = sum(1 for i in layers if every and (i + 1) % every == 0)
            n_ckpt += ckpts
            j = c * pp + stage
            last = j == pp * v - 1
            # (bf16-mixed: with autocast's copy of the head's weight)
            head_saved = (head + (2 * head_matmul if bf16_mixed else 0)) if last else 0
            saved = ckpts * ckpt + (len(layers) - ckpts) * full + head_saved
            if bf16_mixed:
                # autocast's bf16 weight copies: autograd keeps them per microbatch in flight (saved tensors, not
                # parameters); a checkpointed block's are not saved, but autocast's cast cache holds every weight
                # cast during the forward until GPT.forward leaves the region (under ZeRO-3 too)
                saved += 2 * sp.block_matmul * (len(layers) - ckpts)
            per_chunk.append(saved)
            held_out.append(0 if last else kept)
            heads.append(head_saved)
            n_layers.append(len(layers))
            # the gradients a chunk's first pass makes before its embedding's (the embedding's own come last)
            chunk_grads.append(sp.block * len(layers) + (sp.outer - embedding_parameters(cfg, tp) if j == 0 else 0))
            # (once B has run, the loss is dropped and with it cross entropy's nodes, which W never runs: their saved
            # log-softmax goes, W's records take its place)
            recorded.append(len(layers) * recorded_layer + (recorded_head - logits if last else 0))
        recompute = int(full) if n_ckpt else 0  # the block being recomputed
        reducing = 0
        copies = 4 if work.backend == "gloo" else 3
        if scattered:
            # a unit's gradients reduce-scattered during the backward (runner/gpt/zero.py): its parameters' gradients,
            # their flattened copy, and the previous unit's still in flight (and gloo's copy of it) -- three or four of
            # the largest unit's, once the backward has freed that unit's block's activations
            # (blocks' units: the outer one -- embeddings, final norm, head -- completes last, its embedding's gradient
            # at the very end, when no block's activations are held; it is the largest unit of models with a large
            # vocabulary and an untied head)
            reducing = max(0, copies * max(units[: len(sp.layers)] or units) * w - int(full))
        # Cross entropy's backward on the head's chunk: the loss's gradient beside the log-softmax, then the logits'
        # gradient (tensor parallel: its forward's shifted logits and their exponentials, its backward's two copies).
        head_backward = 2 * logits
        if bf16_mixed:
            head_backward += logits // LOGIT_BYTES * 2  # the head's bfloat16 logits beside their float32 copy
            always += 2 * sp.block_matmul * n_ckpt
            notes.append("bf16-mixed: autocast's bfloat16 weight copies counted (2 bytes a matmul weight)")
        if v > 1 and m % pp:  # no such interleaved schedule (validation says so): the closed form's average chunk
            points: tuple[BackwardPoint, ...] = (BackwardPoint((1,) * v, (0,) * v, True, v - 1, "B"),)
            per_chunk = [flight * b for b in per_chunk]
        else:
            points = backward_points(work.schedule, pp, m, stage, v)
        split_b = splits_backward(work.schedule) and pp > 1
        during = -1
        for pt in points:
            c = pt.chunk
            j = c * pp + stage
            held = sum(n * b for n, b in zip(pt.held, per_chunk, strict=True))
            outputs = sum(n * o for n, o in zip(pt.held, held_out, strict=True))
            made = grads * w + full_grads if pt.grads else 0
            # the pass makes weight gradients (a W, or a backward not split), and runs the activations' path (not a
            # W, except on the first virtual stage, whose W runs the whole backward)
            weights = pt.kind == "W" or not split_b
            path = pt.kind == "B" or j == 0
            fresh = fresh_block if weights else 0
            waiting = fresh_vocab if tied and weights else 0
            # One pass's moments follow one another, so only the largest counts: cross entropy's backward, the head's
            # matmul, each block's start (its recompute, the gradient flowing in, its first fresh weight gradient), the
            # last block of a first pass (the ones above it freed their activations and made their gradients), the
            # embedding's gradient at its end, a unit's reduce-scatter.
            moments = {"its start": 0}  # (a chunk without layers, head or embedding adds nothing)
            if not path:  # a W: one weight's fresh gradient at a time, the head's among them on its chunk
                fresh_w = max(fresh, fresh_vocab if j == pp * v - 1 else 0)
                moments["a weight's fresh gradient"] = in_blocks + recompute + fresh_w
            else:
                if j == pp * v - 1 and pt.kind == "B":
                    moments["cross entropy's backward"] = head_backward
                    moments["the head's backward"] = logits + tokens * h * compute + (fresh_vocab if weights else 0)
                n = n_layers[c]
                if n:
                    top = waiting - heads[c] + flow + fresh + in_blocks + recompute
                    moments["a block's backward start"] = top
                    if reducing:
                        moments["a unit's reduce-scatter"] = waiting - heads[c] + in_blocks + reducing
                    if weights and not pt.grads and not scattered and n > 1:
                        layer = (per_chunk[c] - heads[c]) / n
                        moments["its last block"] = top + (n - 1) * (sp.block * w - layer)
                if j == 0 and weights:
                    # the embeddings' backward ends the pass: this microbatch's activations are gone, the blocks'
                    # gradients made (ZeRO-1 without a pipeline has flattened each block's unit for its all-reduce
                    # already), and the embeddings' fresh gradients -- the tied one beside the head's that waited for
                    # it and their sum, which autograd adds out of place
                    end_grads = (chunk_grads[c] * w if not scattered else grads * w) if not pt.grads else made
                    if flattens_blocks:
                        end_grads += sp.block * len(sp.layers) * w
                    positions = cfg.block_size * h * grad_width if cfg.learned_positions else 0
                    vocab_grads = fresh_vocab * (3 if tied else 1) + positions
                    moments["the embeddings' backward at its end"] = (
                        end_grads - made - per_chunk[c] - held_out[c] + vocab_grads + tokens * h * residual
                    )
                    if scattered and sp.outer:
                        # then the outer unit (embeddings, final norm, head) completes and is reduce-scattered: its
                        # gradients, their flattened copy and gloo's copy of it, beside every unit's shard (the blocks'
                        # reductions are done: no previous unit in flight)
                        moments["the outer unit's reduce-scatter"] = (
                            end_grads - made - per_chunk[c] - held_out[c] + (copies - 1) * sp.outer * w
                        )
            moment = max(moments, key=lambda k: moments[k])
            extra = always + moments[moment] + sum(n * b for n, b in zip(pt.awaiting_w, recorded, strict=True))
            activations = max(activations, int(held))
            if held + outputs + made + extra > during:
                during, transient = int(held + outputs + made + extra), int(outputs + extra)
                which = (
                    "a backward pass after the first (gradients held)"
                    if pt.grads
                    else "the first backward pass (no gradients yet)"
                )
                peak_at = f"{which}: {moment}"
        flat = grads * (4 if work.reduce_fp32 else w)
        if dp > 1 and zero <= 1 and grads * w + flat > during:
            # the backward's end: the gradients flattened into the all-reduce buffers (data parallelism's buckets,
            # runner/gpt/data_parallel.py; ZeRO-1's units, zero.py; float32 under reduce_fp32) beside the parameters'
            # own, until the reductions complete and the gradients become views of them
            during, transient, peak_at = grads * w + flat, flat, "the gradients' all-reduce at the backward's end"
        step = grads * w + step_bytes
        if step > during:
            transient, peak_at = 0, "AdamW's step (the gradients and its temporaries)"
        peak = params * w + optimizer + max(during, step)
    else:
        transient, kv, peak_at = inference_bytes(cfg, layout, work, sp, rows, always, in_blocks)
        peak = params * w + kv + transient
    return RankMemory(
        stage=stage,
        param_count=params,
        param_bytes=params * w,
        grad_bytes=grads * w,
        optimizer_bytes=optimizer,
        activation_bytes=int(activations),
        kv_cache_bytes=kv,
        transient_bytes=int(transient),
        microbatch_size=mb,
        in_flight=flight,
        notes=tuple(notes),
        optimizer_step_bytes=int(step_bytes),
        peak_bytes=int(peak),
        peak_at=peak_at,
    )


def layout_memory(cfg: GPTConfig, layout: Layout, work: Workload) -> RankMemory:
    """The rank that needs the most bytes (pipeline stages differ: the first holds the most microbatches,
    the first and last the embedding and head)."""
    return max((rank_memory(cfg, layout, work, r) for r in range(layout.pp)), key=lambda m: m.total)
