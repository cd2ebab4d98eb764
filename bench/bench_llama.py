"""Our Llama (runner/gpt/model.py, family 'llama') against transformers' LlamaForCausalLM, same weights and inputs.

Both sides are one CPU process's float32 model with scaled_dot_product_attention (transformers'
attn_implementation="sdpa"), on one thread (as the runner starts a CPU rank). Transformers builds a Llama
with random weights (grouped-query attention: 8 query heads over 2 key/value heads, SwiGLU, untied head,
rope_theta 500000), saves it with save_pretrained, and ours loads that folder by our names
(runner/job/checkpoint.py HFFolder); before timing, the logits of the two must agree within 1e-5 of the
largest (tests/test_llama.py argues the bound) -- the same model, not just the same shapes.

Measured, barrier-free since there is one process:
- forward: the logits of a [batch, seq] batch under no_grad;
- train step: zero_grad, forward, float32 cross entropy over every position (the same call on both sides:
  transformers' own `labels` path would shift the targets), backward, torch.optim.AdamW's step.
Rounds of one pass per side, the order of the sides flipped every round, so drift in the machine hits both
alike; a round's ratio is ours / theirs. The section gives the median ratio, its 95% interval and a verdict
only where the interval excludes 1 (bench/results.py compare_sentence).

Run: `python bench/bench_llama.py` (or `make bench`; `--quick` or BENCH_QUICK=1 for a short run). It writes
the "## Llama against transformers" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import compare_sentence, machine_lines, quick_mode, spread, write_section  # noqa: E402

# A Llama of the 'small' preset's width: 4 layers of d 256, 8 heads of 32 over 2 key/value heads, SwiGLU 688,
# vocabulary 8192 (untied): 7.0 M parameters, so the matmuls dominate a step of about a second.
DIMS = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=688, vocab_size=8192, max_position_embeddings=256, rope_theta=500000.0,
            tie_word_embeddings=False)  # fmt: skip
BATCH, SEQ, LR = 4, 128, 1e-3
FULL = {"warmup": 3, "rounds": 61}
QUICK = {"warmup": 1, "rounds": 5}


def build(tmp: Path):
    """(ours, theirs) holding the same weights: transformers' random Llama, saved and loaded by our names."""
    import torch
    import transformers

    from runner.gpt.model import GPT
    from runner.job.checkpoint import HFFolder, config_from_hf_folder, load_hf_folder

    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DIMS, attn_implementation="sdpa"))
    theirs.save_pretrained(tmp)
    ours = load_hf_folder(GPT(config_from_hf_folder(tmp)), HFFolder(tmp))
    return ours.train(), theirs.train()


def passes(ours, theirs, idx, targets):
    """Per side, the two timed passes: forward (no_grad logits) and a train step (AdamW)."""
    import torch
    import torch.nn.functional as F

    def logits_of(model):
        return (lambda x: model(x)) if model is ours else (lambda x: model(input_ids=x).logits)

    def forward(model):
        run = logits_of(model)

        def go() -> None:
            with torch.no_grad():
                run(idx)

        return go

    def train(model):
        run, opt = logits_of(model), torch.optim.AdamW(model.parameters(), lr=LR)

        def go() -> float:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(run(idx).flatten(0, 1).float(), targets.flatten())
            loss.backward()
            opt.step()
            return loss.item()

        return go

    return {"forward": (forward(ours), forward(theirs)), "train step": (train(ours), train(theirs))}


def interleaved(ours, theirs, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of each side, one pass each per round, the order flipped every round."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            fn = ours if side == 0 else theirs
            start = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - start)
    return times[0], times[1]


def measure(settings: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build(Path(tmp))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, DIMS["vocab_size"], (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, DIMS["vocab_size"], (BATCH, SEQ), generator=gen)
    with torch.no_grad():
        a, b = ours(idx), theirs(input_ids=idx).logits
    agreement = ((a - b).abs().max() / b.abs().max()).item()
    assert agreement <= 1e-5, f"ours and transformers' logits differ by {agreement:.2e} of the largest"
    out: dict = {"agreement": agreement, "params": sum(p.numel() for p in ours.parameters()), "timings": {}}
    for what, (mine, other) in passes(ours, theirs, idx, targets).items():
        interleaved(mine, other, settings["warmup"])
        out["timings"][what] = interleaved(mine, other, settings["rounds"])
    return out


def section(res: dict, settings: dict, quick: bool) -> str:
    import transformers

    lines = [
        "## Llama against transformers",
        "",
        "Our GPT in the Llama family against transformers' `LlamaForCausalLM`, both float32 on one CPU thread "
        "with scaled-dot-product attention, loaded with the same weights (transformers' random init, "
        "`save_pretrained`, read back by our names): 4 layers of width 256, 8 query heads over 2 key/value heads, "
        f"SwiGLU 688, untied vocabulary 8192 ({res['params'] / 1e6:.1f} M parameters); batch {BATCH} x "
        f"sequence {SEQ}. Before timing, the logits agree within {res['agreement']:.1e} of the largest. "
        f"{settings['rounds']} rounds of one pass per side, the order flipped every round"
        + (" (quick run)" if quick else "")
        + ".",
        "",
        "| pass | ours median (ms) | transformers median (ms) | ours range (ms) | theirs range (ms) |",
        "|---|---|---|---|---|",
    ]
    sentences = []
    for what, (mine, other) in res["timings"].items():
        m, m_lo, m_hi = spread(mine)
        t, t_lo, t_hi = spread(other)
        lines.append(f"| {what} | {m * 1e3:.1f} | {t * 1e3:.1f} | {m_lo * 1e3:.1f}..{m_hi * 1e3:.1f} | "
                     f"{t_lo * 1e3:.1f}..{t_hi * 1e3:.1f} |")  # fmt: skip
        ratios = [a / b for a, b in zip(mine, other, strict=True)]
        sentences.append("- " + compare_sentence(what.capitalize(), ratios, noun="interleaved rounds"))
    lines += ["", *sentences, "", *machine_lines(), f"- transformers {transformers.__version__}", ""]
    lines.append(
        "What differs in the work: ours runs Q, K and V as one matmul and SwiGLU's gate and up as another, where "
        "transformers runs five, and our rotary heads and SwiGLU product are autograd functions whose backward "
        "writes the stacked gradient in place (runner/gpt/rotary.py, swiglu.py) where autograd concatenates; both "
        "pass the key/value heads to SDPA ungrouped (`enable_gqa`, no mask)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (also BENCH_QUICK=1)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    quick = quick_mode(args.quick)
    settings = QUICK if quick else FULL
    res = measure(settings)
    text = section(res, settings, quick)
    print(text)
    if not args.no_write:
        write_section("Llama against transformers", text, REPO / "bench" / "RESULTS.md")


if __name__ == "__main__":
    main()
