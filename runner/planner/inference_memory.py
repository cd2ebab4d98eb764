"""The memory of a forward or generate pass on one rank (torch-free): no backward, so a block's working set, the
loss over the gathered logits, the KV cache and its growth. runner/planner/memory.py calls it for those workloads.

Forward and generate keep nothing for a backward: a block's working set (its input, the
residual after attention, the LayerNorm's output, c_fc's output and GELU's), and on the last stage the loss over
the gathered logits (the logits, a float32 copy when they are narrower, the log-softmax; under tensor
parallelism the gather's shards beside it). Under bf16-mixed autocast's cast cache keeps the bfloat16 copy of every
weight cast since GPT.forward began (at its last block, every block's); a stage that is not the last still has its
earlier microbatches' hidden states in flight, sent but not yet received. Not held by a test: under tensor
parallelism gloo's worker threads release a finished collective's tensors some time after the caller's wait
returns, so a race decides how many are still alive at the peak (README). Generate keeps a KV cache of
2 * layers * b * (s + new_tokens - 1) * kv values (float32, else bf16; kv the rank's key/value width: h/t for
GPT-2, n_kv_head * head_dim / t or one copied head's head_dim under grouped-query attention), its peak either the
prompt's pass or the last token's, when torch.cat grows a layer's keys by a copy. A Llama block's MLP holds c_fc's
output (gate and up, 2f/t), silu(gate) and their product (f/t each) at once: 4f/t where GPT-2's holds 2f/t.
"""

from __future__ import annotations

from runner.gpt.config import GPTConfig
from runner.planner.byte_counts import StageParameters, tp_widths
from runner.planner.models import LOGIT_BYTES, Layout, Workload, padded_vocab


def inference_bytes(
    cfg: GPTConfig, layout: Layout, work: Workload, sp: StageParameters, rows: int, always: int, in_blocks: int
) -> tuple[int, int, str]:
    """Forward and generate run without autograd (runner/gpt/pipeline.py, model.py): (transient bytes at the peak,
    KV cache bytes, the peak's moment). Nothing is kept for a backward; a block holds its working set -- its input,
    the residual after attention and the LayerNorm's output (h each), c_fc's output and GELU's (4h/t each) -- for
    one microbatch. Under bf16-mixed, autocast's cast cache keeps the bfloat16 copy of every weight cast since the
    stage's forward began (parameters require grad even under no_grad, so they are cached) until GPT.forward
    returns: at its last block, every block's copy."""
    tp, pp = layout.tp, layout.pp
    stage, layers = sp.stage, len(sp.layers)
    s, h = work.seq, cfg.n_embd
    compute = work.activation_width
    m = work.microbatches_for(layout)
    mb = max(1, rows // m)
    bf16_mixed = work.dtype == "bf16-mixed"
    casts = 2 * sp.block_matmul * layers if bf16_mixed else 0
    # and at the head, its weight's copy too (the last stage's head multiplies by the tied weight)
    all_casts = 2 * (sp.matmul if stage == pp - 1 else sp.block_matmul * layers) if bf16_mixed else 0
    _, kv_width, f = tp_widths(cfg, tp)
    mlp = (4 if cfg.is_llama else 2) * f  # c_fc's output and GELU's; SwiGLU's c_fc output, silu(gate), the product
    around = (4 if cfg.is_llama else 3) * h  # input, residual after attention, norm output (RMSNorm: x * rsqrt too)
    block = int(s * mb * (around + mlp) * compute) + in_blocks + casts if layers else 0
    if stage < pp - 1:
        # a stage's outputs wait to be received: the first runs ahead, and each microbatch's hidden states (float32,
        # the residual stream's width) are still in flight while it works on its last microbatch
        block += (m - 1) * s * mb * h * work.residual_width
    if work.workload == "generate":
        # every microbatch's cache, 2 x layers x (s + new_tokens - 1) positions x kv (the last token is picked, not
        # cached); the prompt's pass (prefill) caches s positions while a block works on them; the last pass grows
        # each layer's keys by a copy (torch.cat), old and new side by side
        per_position = 2 * layers * rows * kv_width * compute
        kv = per_position * (s + work.new_tokens - 1)
        prefill = per_position * s + max(block, all_casts)
        growing = mb * (s + work.new_tokens - 1) * kv_width * compute if layers else 0
        last = kv + max(growing + casts, all_casts)
        if prefill > last:  # (a short generation: the prompt's working set outweighs the cache's growth)
            return always + prefill - kv, kv, "generate: the prompt's pass"
        return always + last - kv, kv, "generate: the last token's pass"
    head = 0
    if stage == pp - 1:
        vocab = padded_vocab(cfg.vocab_size, tp)
        logits = rows * s * vocab * compute  # every microbatch's full logits, gathered under tensor parallelism
        # the loss (runner/job/rank.py): the logits, their float32 copy when they are narrower, the log-softmax
        head = logits + rows * s * vocab * LOGIT_BYTES * (2 if compute != LOGIT_BYTES else 1)
        per_mb = mb * s * vocab * compute
        if tp > 1:  # gathering a microbatch's: the earlier ones, its shards, the gathered tensor and the local shard
            head = max(head, logits - per_mb + int(per_mb * (2 + 1 / tp)))
        # the last microbatch's head inside the forward: every weight's copy, the earlier microbatches' logits, its own
        head = max(head, all_casts + logits - per_mb + per_mb // tp)
    if head > block:
        return always + head, 0, "forward: the loss over the gathered logits"
    return always + block, 0, "forward: a block's working set"
