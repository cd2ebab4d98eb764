"""The model's family and parts on the Launch and Planner pages: their inputs for a custom model, and what a Hugging
Face folder's config.json says the model is (in runner.gpt.config.describe_model's words)."""

from __future__ import annotations

from typing import Any

from runner.gpt.config import FAMILIES, GPTConfig, describe_model
from runner.job.checkpoint import config_from_hf_folder, is_hf_folder
from runner.spec.run_spec import FROM_WEIGHTS


def checkpoint_dims(weights: str | None) -> str | None:
    """What a Hugging Face folder's config.json says the model is, or why it cannot be read; None for no folder."""
    if not is_hf_folder((weights or "").strip() or None):
        return None
    try:
        return "config.json: " + describe_model(config_from_hf_folder(weights.strip()))
    except (OSError, ValueError) as exc:
        return f"config.json: {exc}"


def follow_weights_folder(weights_key: str, model_key: str) -> None:
    """An on_change for a weights field: a Hugging Face folder typed in sets the model to the one its config.json
    gives (FROM_WEIGHTS), as `runner submit --weights DIR` does without --model, rather than leaving a preset the
    folder then contradicts. Any other path leaves the model as the user chose it."""
    import streamlit as st

    if is_hf_folder((st.session_state.get(weights_key) or "").strip() or None):
        st.session_state[model_key] = FROM_WEIGHTS


def model_parts_inputs(prefix: str, base: GPTConfig | None = None, container=None,
                       preset: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The family and its parts as form inputs (a custom model on the Launch and Planner pages): family,
    key/value heads, MLP width, rotary base, tied head. Empty numbers mean the family's default, or with `preset`
    (the Planner's dimensions over a preset) that preset's own value, which each field's help then names."""
    import streamlit as st

    box = container or st
    base = base or GPTConfig()
    kept = {"n_kv_head": "n_head", "ffn_hidden": "4 x n_embd", "rope_theta": "10000"}
    if preset:
        kept = {"n_kv_head": str(base.kv_heads), "ffn_hidden": str(base.d_ff), "rope_theta": f"{base.rope_theta:g}"}
        kept = {k: f"{preset}'s {v}" for k, v in kept.items()}
    c1, c2, c3 = box.columns(3)
    family = c1.selectbox("family", FAMILIES, index=FAMILIES.index(base.family), key=prefix + "family",
                          help="gpt2: LayerNorm, learned positions, GELU MLP, biases; llama: RMSNorm, rotary "
                               "positions, SwiGLU MLP, no biases")  # fmt: skip
    kv = c2.number_input("n_kv_head", value=None, step=1, key=prefix + "n_kv_head", placeholder=str(base.kv_heads),
                         help=f"key/value heads, dividing n_head (grouped-query attention); empty: {kept['n_kv_head']}")  # fmt: skip
    ffn = c3.number_input("ffn_hidden", value=None, step=1, key=prefix + "ffn_hidden", placeholder=str(base.d_ff),
                          help=f"the MLP's hidden width; empty: {kept['ffn_hidden']}")  # fmt: skip
    c1, c2 = box.columns(2)
    theta = c1.number_input("rope_theta", value=None, step=1000.0, key=prefix + "rope_theta", disabled=family != "llama",
                            placeholder=f"{base.rope_theta:g}", help=f"rotary base (llama); empty: {kept['rope_theta']}")  # fmt: skip
    tie = c2.checkbox("tie head", value=base.tie_head, key=prefix + "tie_head",
                      help="the LM head shares the token embedding's weight")  # fmt: skip
    return {"family": family, "n_kv_head": kv, "ffn_hidden": ffn,
            "rope_theta": theta if family == "llama" else None, "tie_head": tie}  # fmt: skip
