"""Launch page: pick a strategy, degrees, model and workload; see problems, memory and the command; launch."""

from __future__ import annotations

import dataclasses

import streamlit as st

from runner import api
from runner.gpt.config import describe_model
from runner.service.launchers.slurm import nodes_for, render_sbatch
from runner.spec.estimates import memory_estimate
from runner.spec.run_spec import (
    DEVICES,
    DTYPE_KEEPS,
    DTYPES,
    FROM_WEIGHTS,
    MODEL_PARTS,
    PRESETS,
    SCHEDULES,
    TP_STYLES,
    WORKLOADS,
    ZERO_STAGES,
    SpecError,
)
from runner.spec.strategies import get_strategy, strategy_names
from storage.db import runs_dir
from ui.format import human_bytes
from ui.forms import oversubscription_warning, problems_by_field, prompt_seq, repeat_note, spec_from_form, uses
from ui.hosts import HERE, gpu_line, host_lines, partition_text, target_for, targets
from ui.model_parts import checkpoint_dims, follow_weights_folder, model_parts_inputs
from ui.state import engine, enter_through_app

enter_through_app()  # a deep link on a fresh server would otherwise skip app.py

K = "launch_"  # widget keys are namespaced per page
SELFTEST_TAG = "selftest"  # the tag runner.selftest puts on its runs; History filters on it

st.title("Launch a run")
here = api.this_host()
# Every host serving this database, read once per rerun: the "Run on" choices and their GPU counts.
run_on_options = targets(api.hosts(engine()), here)

notes: dict[str, st.delta_generator.DeltaGenerator] = {}


def note_slot(field: str) -> None:
    """A place right under a widget where its validation messages appear."""
    notes[field] = st.empty()


# The number fields carry no min_value or max_value: a browser keeps a value outside them to itself (a small red
# "!") and the script goes on with the last valid one, so batch 0 would launch batch 8. validate_spec judges
# every value instead, and its message shows under the field.
values: dict = {}
model_note = None  # where the preset's description goes (a placeholder, when a preset is chosen)
left, mid, right = st.columns([1.1, 1, 1])
with left:
    st.subheader("Strategy")
    names = strategy_names()  # what a strategy is comes from the registry: names, help, fields used
    values["strategy"] = st.selectbox(
        "strategy", names, key=K + "strategy", index=names.index("layer"),
        help="\n".join(f"**{n}**: {get_strategy(n).help}" for n in names),
    )  # fmt: skip
    note_slot("strategy")
    s = values["strategy"]
    st.caption(get_strategy(s).help)
    c1, c2, c3 = st.columns(3)
    values["tp"] = c1.number_input("tp", value=2, key=K + "tp", disabled=not uses(s, "tp"))
    values["pp"] = c2.number_input("pp", value=2, key=K + "pp", disabled=not uses(s, "pp"))
    values["dp"] = c3.number_input("dp", value=2, key=K + "dp", disabled=not uses(s, "dp"))
    for f in ("tp", "pp", "dp"):
        note_slot(f)
    c1, c2 = st.columns(2)
    # A schedule's microbatches default to 4 (a pipeline to fill); elsewhere to 1, the CLI's: there more
    # microbatches mean gradient accumulation, which a run from the page took unasked. A key per kind keeps each.
    piped = uses(s, "schedule")
    values["microbatches"] = c1.number_input(
        "microbatches",
        value=4 if piped else 1,
        key=K + ("microbatches" if piped else "microbatches_accumulated"),
        disabled=not uses(s, "microbatches"),
        help="microbatches a pipeline step is cut into" if piped else "microbatches whose gradients accumulate "
        "before one optimizer step (1: the whole batch at once)",
    )
    values["schedule"] = c2.selectbox(
        "schedule", SCHEDULES, index=1, key=K + "schedule", disabled=not uses(s, "schedule")
    )
    note_slot("microbatches")
    note_slot("schedule")
    interleaved = uses(s, "virtual_stages") and values["schedule"] == "interleaved-1f1b"
    c1, c2 = st.columns(2)
    values["virtual_stages"] = c1.number_input(
        "virtual stages", value=2 if interleaved else 1, key=K + "virtual_stages",
        disabled=not interleaved, help="model chunks per pipeline rank (interleaved-1f1b only): the bubble shrinks "
        "to (p-1)/(v*m + p-1) at the cost of v times the point-to-point sends",
    )  # fmt: skip
    values["zero_stage"] = c2.selectbox(
        "ZeRO stage", ZERO_STAGES, key=K + "zero_stage", disabled=not uses(s, "zero_stage"),
        help="sharded data parallelism over the dp replicas: 0 none, 1 optimizer state, 2 and gradients, "
        "3 and parameters (gathered before use)",
    )  # fmt: skip
    if not interleaved:  # a disabled field keeps what was typed; the spec gets the neutral value
        values["virtual_stages"] = 1
    note_slot("virtual_stages")
    note_slot("zero_stage")
    c1, c2 = st.columns(2)
    values["tp_style"] = c1.selectbox("tp style", TP_STYLES, key=K + "tp_style", disabled=not uses(s, "tp_style"))
    values["sequence_parallel"] = c2.checkbox(
        "sequence parallel", key=K + "sequence_parallel", disabled=not uses(s, "sequence_parallel")
    )
    note_slot("tp_style")
    note_slot("sequence_parallel")

with mid:
    st.subheader("Model and workload")
    presets = [*PRESETS, "custom", FROM_WEIGHTS]
    values["model"] = st.selectbox("model", presets, key=K + "model")
    note_slot("model")
    if values["model"] == "custom":
        base = PRESETS["tiny"]
        c1, c2, c3 = st.columns(3)
        values["n_layer"] = c1.number_input("n_layer", value=base.n_layer, key=K + "n_layer")
        values["n_head"] = c2.number_input("n_head", value=base.n_head, key=K + "n_head")
        values["n_embd"] = c3.number_input("n_embd", value=base.n_embd, key=K + "n_embd")
        c1, c2 = st.columns(2)
        values["vocab_size"] = c1.number_input("vocab_size", value=base.vocab_size, key=K + "vocab")
        values["block_size"] = c2.number_input("block_size", value=base.block_size, key=K + "block")
        for f in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            note_slot(f)
        # the placeholders show what an empty field becomes at the dimensions typed above (n_head, 4 x n_embd)
        typed = {f: values[f] for f in ("n_head", "n_embd") if isinstance(values[f], int) and values[f] > 0}
        values.update(model_parts_inputs(K, dataclasses.replace(base, **typed)))
        for f in MODEL_PARTS:
            note_slot(f)
    elif values["model"] in PRESETS:
        model_note = st.empty()  # filled once the data is known: text read byte by byte makes the vocabulary 256
    if values["model"] == FROM_WEIGHTS:
        st.caption("the dimensions come from the weights folder's config.json (set it under Run)")
    values["workload"] = st.radio("workload", WORKLOADS, index=2, key=K + "workload", horizontal=True)
    note_slot("workload")
    c1, c2, c3 = st.columns(3)
    values["batch"] = c1.number_input("batch", value=8, key=K + "batch")
    # A generate run's prompt is its sequence (its field is further down, its text kept in the session): the seq
    # field says so and takes no value, where a 30 shown beside "seq follows the prompt: 11 tokens" was ignored.
    prompted = values["workload"] == "generate" and bool(str(st.session_state.get(K + "prompt") or "").strip())
    values["seq"] = c2.number_input("seq", value=64, key=K + "seq", disabled=prompted,
                                    help="set by the prompt: its tokens are the sequence" if prompted else None)  # fmt: skip
    values["new_tokens"] = c3.number_input(
        "new tokens", value=16, key=K + "new_tokens", disabled=values["workload"] != "generate"
    )
    for f in ("batch", "seq", "new_tokens"):
        note_slot(f)
    values["checkpoint"] = st.text_input(
        "activation checkpointing", value="none", key=K + "checkpoint",
        disabled=values["workload"] != "train", help="none; blocks (every block recomputes its activations in "
        "backward); every-K (every K-th block, e.g. every-2): memory saved against recompute time",
    ).strip() or "none"  # fmt: skip
    if values["workload"] != "train":
        values["checkpoint"] = "none"
    note_slot("checkpoint")
    c1, c2 = st.columns(2)
    values["steps"] = c1.number_input("timed steps", value=5, key=K + "steps")
    values["warmup"] = c2.number_input("warm-up steps", value=1, key=K + "warmup")
    note_slot("steps")
    note_slot("warmup")
    c1, c2 = st.columns([2, 1])
    values["data"] = c1.text_input(
        "data", value="synthetic", key=K + "data", help="synthetic: random tokens (no learning possible); stdlib: this "
        "Python's own sources, byte-level; a folder or file of text (tokenizer.json beside the weights file, else "
        "byte-level); a nanoGPT folder holding train.bin and val.bin",
    ).strip() or "synthetic"  # fmt: skip
    values["eval_every"] = c2.number_input(
        "eval every", value=0, key=K + "eval_every", disabled=values["workload"] != "train",
        help="the loss on the corpus's held-out split every this many steps (0: never)",
    )  # fmt: skip
    note_slot("data")
    note_slot("eval_every")
    values["prompt"] = st.text_input(
        "prompt", key=K + "prompt", disabled=values["workload"] != "generate",
        help="generate on text: every row starts from this text, and the run page shows its continuation",
    )  # fmt: skip
    if values["workload"] != "train":  # a disabled field keeps what was typed; the spec gets the neutral value
        values["eval_every"] = 0
    if values["workload"] != "generate":
        values["prompt"] = None
    elif values["prompt"]:
        st.caption(f"seq follows the prompt: {prompt_seq(values) or '?'} tokens")
    note_slot("prompt")

with right:
    st.subheader("Run")
    keys = [t.key for t in run_on_options]
    if st.session_state.get(K + "run_on") not in keys:
        st.session_state[K + "run_on"] = HERE  # the host chosen before stopped reporting
    target = target_for(
        st.selectbox(
            "run on", keys, key=K + "run_on", format_func=lambda k: target_for(k, run_on_options).choice,
            help="this machine (jobs run where they are launched), another host whose runner is alive, a Slurm "
            "partition (a runner started with `serve --backend slurm`; its nodes and GPUs as sinfo reports them), or "
            "whichever host first has the devices it needs. The form is checked against that target.",
        ),
        run_on_options,
    )  # fmt: skip
    values["_gpu_count"] = target.gpu_count
    values["_target"] = target  # the spec is judged against where it runs: a partition's nodes and layout rules
    if target.is_slurm:  # the choice names the partition: its facts in full
        st.caption(f"Partition {target.partition.name}: {partition_text(target.partition)} (from sinfo)")
    else:
        st.caption(target.label.split(": ", 1)[-1])  # its devices, or that its runner is not reporting
    if not target.is_slurm and st.session_state.get(K + "nodes") is not None:
        st.session_state[K + "nodes"] = None  # nodes apply to a partition only: a disabled box shows nothing
    values["nodes"] = st.number_input(
        "nodes", value=None, step=1, key=K + "nodes", disabled=not target.is_slurm,
        placeholder=f"runner decides (partition {target.partition.name} has {target.node_count})"
        if target.is_slurm else "Slurm partitions only",
        help="Slurm nodes the run spreads over: nodes x GPUs per node (ranks per node on CPU nodes) = world size; "
        "tensor parallelism stays inside a node, pipeline stages go across nodes. Empty: the runner decides.",
    )  # fmt: skip
    note_slot("nodes")
    if target.is_slurm and target.partition.error:
        st.warning(f"The partition's nodes are unknown: {target.partition.error}", icon=":material/warning:")
    c1, c2 = st.columns(2)
    values["device"] = c1.selectbox("device", DEVICES, key=K + "device")
    values["dtype"] = c2.selectbox("dtype", DTYPES, key=K + "dtype",
                                   help="; ".join(f"{d}: {DTYPE_KEEPS[d]}" for d in DTYPES))  # fmt: skip
    sixteen = values["dtype"] in ("bfloat16", "bf16-master")  # float32 gradients need no wider reduction
    values["reduce_fp32"] = sixteen and c2.checkbox(
        "reduce gradients in float32", key=K + "reduce_fp32",
        help="16-bit gradients cast to float32 for the data-parallel reduction (data parallelism, dp 2 or more)",
    )  # fmt: skip
    note_slot("device")
    note_slot("dtype")
    note_slot("reduce_fp32")
    values["verify"] = st.checkbox(
        "verify against the single-device reference", value=True, key=K + "verify",
        help="runs the reference on the same inputs and judges logits, loss, gradients and updated weights against "
        "tolerances for the dtype: a pass or fail on the run page, with every difference beside it",
    )  # fmt: skip
    c1, c2 = st.columns(2)
    # Text, not a number input: the browser's numbers stop at 2**53 and a seed may be any size.
    seed_text = c1.text_input("seed", value="0", key=K + "seed", help="any whole number of 0 or more").strip()
    values["seed"] = int(seed_text) if seed_text.isdecimal() and seed_text.isascii() else seed_text
    values["time_limit_s"] = float(c2.number_input("time limit (s)", value=600, key=K + "time_limit"))
    note_slot("seed")
    note_slot("time_limit_s")
    values["tags"] = st.text_input("tags (comma separated)", key=K + "tags")
    note_slot("tags")
    repeat = int(st.number_input(
        "repeat", value=1, step=1, key=K + "repeat",
        help=f"queue this many runs of the spec (1 to {api.MAX_REPEAT}) as one comparison set: run one at a time, "
        "they give Compare a median with its interval instead of one noisy figure",
    ))  # fmt: skip
    note_slot("repeat")
    if not api.repeat_problem(repeat) and (note := repeat_note(repeat)):
        st.caption(note)
    user = st.text_input(
        "launched by", value=api.default_user(), key=K + "user", max_chars=64,
        help="recorded with the run so the team's history says who ran what",
    ).strip() or api.default_user()  # fmt: skip
    values["weights"] = st.text_input(
        "weights (optional)", key=K + "weights", placeholder="model.safetensors or a HF folder",
        help="a GPT-2 .safetensors/.pt file, or a Llama, Qwen2 or Mistral folder (the model becomes 'checkpoint')",
        on_change=follow_weights_folder, args=(K + "weights", K + "model"),
    )  # fmt: skip
    note_slot("weights")
    if folder := checkpoint_dims(values["weights"]):
        st.caption(folder)

spec, problems = spec_from_form(values)
if model_note is not None:  # the preset as this run builds it (RunSpec.model_config), else as published
    model_note.caption(describe_model(spec.model_config() if spec is not None else PRESETS[values["model"]]))
problems += [p for p in [api.repeat_problem(repeat)] if p]
by_field = problems_by_field(problems)
for field, messages in by_field.items():
    slot = notes.get(field)
    # named even under its own widget: fields sharing a row share the slot's place (batch 0 and seq 0 read alike)
    text = f"**{field}**: " + "\n\n".join(messages)
    (slot if slot is not None else st).error(text, icon=":material/error:")

st.divider()
info, devices = st.columns([2, 1])
with info:
    if spec is not None and not problems:
        est = memory_estimate(spec)
        c1, c2, c3 = st.columns(3)
        c1.metric("ranks", spec.world_size)
        c2.metric("parameters per rank (largest)", human_bytes(est["param_bytes"]))
        c3.metric("AdamW state per rank", human_bytes(est["optimizer_bytes"]) if est["optimizer_bytes"] else "—")
        if target.is_slurm:
            part = target.partition
            nodes = nodes_for(spec, part.default_nodes, part.gpus_per_node)
            per_node = spec.world_size // nodes
            st.caption(f"One Slurm job on partition {part.name}: {nodes} node{'s' if nodes != 1 else ''} x {per_node} "
                       f"rank{'s' if per_node != 1 else ''}, one torchrun per node with c10d rendezvous on the first "
                       "node. The script its runner will submit (the folder shown as runs/<id>):")  # fmt: skip
            script = render_sbatch(spec, runs_dir() / "<id>", nodes=nodes, partition=part.name, account=part.account,
                                   gpus_per_node=part.gpus_per_node)  # fmt: skip
            st.code(script, language="bash", wrap_lines=True)
        else:
            st.caption("The command the runner will start (each run gets its own folder):")
            st.code(api.torchrun_command(spec), language="bash", wrap_lines=True)
        # The cores judged are this machine's: only said where the run will run here.
        crowded = oversubscription_warning(spec, target.gpu_count) if target.key == HERE else None
        if crowded:
            st.warning(crowded, icon=":material/warning:")
    elif problems:
        n = len(problems)
        st.warning(f"{n} problem{'s' if n > 1 else ''} to fix before launching; each is shown next to its field.")


@st.fragment(run_every=2.0)
def devices_panel() -> None:
    """Refreshes by itself: the runner reports its devices a moment after it starts."""
    st.subheader("Devices")
    hosts = api.hosts(engine())
    if [(t.key, t.label) for t in targets(hosts, here)] != [(t.key, t.label) for t in run_on_options]:
        # The runner reported since the form was drawn (on a first visit it is still starting), or a host came or
        # went: the whole page again, so "run on" and the checks against it say what the sidebar says.
        st.rerun(scope="app")
    status = api.runner_status(engine())
    if status is None or not status["alive"]:
        st.info("The runner is starting; devices appear when it reports.")
    elif status["gpus"]:
        for g in status["gpus"]:
            st.write(gpu_line(g))
        st.caption(status["gpu_note"])  # how many torch can use, which it excluded and why
    else:
        st.write("No usable GPU: runs use CPU processes with the gloo backend.")
        st.caption(status["gpu_note"])
    live, silent = host_lines(hosts, here)
    if len(live) > 1 or silent:  # a team database: every host a run can be sent to
        st.markdown("**Hosts alive**\n\n" + ("\n".join(f"- {line}" for line in live) or "none"))
        if silent:
            st.caption("Not reporting (runs aimed there wait): " + "; ".join(silent))
    c1, c2 = st.columns([1, 1.4], vertical_alignment="bottom")
    device = c1.selectbox("self-test on", DEVICES, key=K + "selftest_device")
    if c2.button(
        "Run the self-test", key=K + "selftest", icon=":material/fact_check:",
        help="queues every strategy these devices allow, each verified against the single-device reference",
    ):  # fmt: skip
        # Kept in the session: this panel redraws every 2 s and the outcome must outlive that.
        try:
            st.session_state[K + "selftest_ids"] = api.submit_selftest(engine(), device=device, user=user)
            st.session_state[K + "selftest_error"] = None
        except SpecError as exc:  # e.g. cuda chosen where the runner sees no GPU
            st.session_state[K + "selftest_error"] = "; ".join(p.message for p in exc.problems)
    if st.session_state.get(K + "selftest_error"):
        st.error(f"The self-test was not queued: {st.session_state[K + 'selftest_error']}", icon=":material/error:")
    queued = st.session_state.get(K + "selftest_ids")
    if queued:
        links = ", ".join(f"[#{i}](/history?run={i})" for i in queued)
        st.success(f"Queued {len(queued)} self-test runs: {links}. [All self-test runs](/history?tag={SELFTEST_TAG})")
    elif queued is not None:
        gpus = len(status["gpus"]) if status and status["alive"] else 0
        st.warning(f"No self-test run fits these devices (the runner sees {gpus} GPU(s)): choose auto or cpu.")


with devices:
    devices_panel()

if st.button("Launch", type="primary", key=K + "submit", disabled=spec is None or bool(problems)):
    try:
        gpus = target.gpus_for(spec)
        if repeat > 1:
            ids = api.submit_set(engine(), [spec], repeat, user=user, gpu_count=gpus, run_on=target.run_on)
        else:
            run_id = api.submit(engine(), spec, user=user, gpu_count=gpus, run_on=target.run_on)
    except SpecError as exc:
        for p in exc.problems:
            st.error(str(p))
    else:
        if repeat == 1:
            st.switch_page("pages/history.py", query_params={"run": str(run_id)})
        listed = ",".join(map(str, ids))
        st.success(f"Queued comparison set {ids[0]}: runs {', '.join(f'[#{i}](/history?run={i})' for i in ids)}, run "
                   f"one at a time. Follow them on [Live](/live); when they have finished, "
                   f"[compare them](/compare?runs={listed}).", icon=":material/check_circle:")  # fmt: skip
