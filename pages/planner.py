"""Planner page: which tp x pp x dp (x ZeRO) layout for a model on some devices, predicted, the recommendation on top;
a layout that fits this host (calibrated the first time it is planned) launched with its prediction; the guide's
GPT-3 175B example answered. Logic: ui/planner.py."""

from __future__ import annotations

import subprocess

import streamlit as st

from runner import api
from runner.gpt.config import describe_model, model_problems
from runner.planner.devices import KINDS, Devices, from_partition, preset
from runner.planner.inputs import MICROBATCH_SIZE_HELP, MICROBATCHES_HELP, default_seq, input_problems
from runner.planner.layouts import DEFAULT_ZERO_STAGES, usable_note, uses_every_device_by_default
from runner.planner.models import MODELS, Workload
from runner.planner.what_fits import what_fits, what_fits_text
from runner.spec.run_spec import DTYPE_KEEPS, DTYPES, SCHEDULES, WORKLOADS, SpecError
from ui import planner as P
from ui.format import human_bytes, human_duration
from ui.model_parts import model_parts_inputs
from ui.simulated import beside_the_table, timeline_window, windowed_chart
from ui.state import engine, enter_through_app

enter_through_app()

K = "planner_"
st.title("Planner")
st.caption(
    "Memory per GPU: parameters, gradients, AdamW state (ZeRO per Rajbhandari et al. 2020), activations of the "
    "microbatches in flight (Korthikanti et al. 2022), KV cache. Step time: each matmul timed by its shape on the "
    "device kind (or at a stated share of peak), bytes over the link each group crosses, NCCL's latency for each "
    "tensor-parallel collective, the schedule's bubble, data-parallel reductions overlapped as the engine does. "
    "Formulas: runner/planner/memory.py, step_time.py, collectives.py."
)
answer = st.container(border=True)  # filled once the plan is computed: the answer comes first
CALIBRATION_FAILED = (RuntimeError, OSError, subprocess.SubprocessError)


def here_devices() -> Devices:
    """This host's devices, calibrated: the first time this host is planned its calibration runs by itself (a few
    seconds); the Calibrate button measures again."""
    if not st.session_state.get(K + "calibration_error") and api.host_calibration(engine()) is None:
        with st.spinner("Calibrating this host, once: a matmul on one device and an all-reduce between two ranks…"):
            try:
                api.calibrate_host(engine())
            except CALIBRATION_FAILED as exc:
                st.session_state[K + "calibration_error"] = str(exc)
    if error := st.session_state.get(K + "calibration_error"):
        st.warning(
            f"Calibration failed, so this host is planned from assumed rates: {error}", icon=":material/warning:"
        )
    return api.this_host_devices(engine())


def layout_choice(options: list[str], key: str) -> str:
    """A layout picker that follows the plan's first (fastest) layout until the user picks one, then keeps that pick
    while the plan still offers it. Options are labels, looked up in this run's plan: a selectbox keeps returning
    the object it returned before while its label is offered, a layout judged on the inputs before the last edit."""
    picked = key + "_picked"
    if not st.session_state.get(picked) or st.session_state.get(key) not in options:
        st.session_state[key] = options[0]  # (a default the user never chose does not outlive an edit)
        st.session_state[picked] = False
    return st.selectbox("layout", options, key=key, on_change=lambda: st.session_state.update({picked: True}))


def calibrate_button(here: Devices) -> None:
    """This host's figures and where they come from, with a button that measures them again."""
    text, button = st.columns([5, 1], vertical_alignment="center")
    text.caption(f"This host: {here.describe()} · {here.source}")
    if button.button("Calibrate", key=K + "calibrate", icon=":material/speed:",
                     help="measure this host again: matmul FLOP/s of one device, all-reduce bandwidth (seconds)"):  # fmt: skip
        with st.spinner("Calibrating this host…"):
            try:
                cal = api.calibrate_host(engine())
            except CALIBRATION_FAILED as exc:
                st.session_state[K + "calibration_error"] = str(exc)
            else:
                st.session_state[K + "calibration_error"] = None
                st.toast(cal.describe())
        st.rerun()


st.subheader("Model and workload")
c1, c2, c3, c4 = st.columns(4)
custom_box = st.container()  # a custom model's ten fields take the page's width: a quarter cuts values and labels
model = c1.selectbox("model", list(MODELS), index=list(MODELS).index("gpt2"), key=K + "model")
base = MODELS[model]
custom = c1.checkbox("custom dimensions", key=K + "custom")
dims = {}
if custom:
    names = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
    for col, name in zip(custom_box.columns(len(names)), names, strict=True):
        dims[name] = int(col.number_input(name, min_value=1, value=getattr(base, name), key=K + name))
    dims.update(model_parts_inputs(K, base, custom_box, preset=model))
chosen = P.PlannerInputs(model, dims).config()
c1.caption(describe_model(chosen))
for field, message in model_problems(chosen):
    c1.error(f"**{field}**: {message}")
workload = c2.selectbox("workload", WORKLOADS, index=2, key=K + "workload")
batch = int(c2.number_input("global batch", min_value=1, value=8, key=K + "batch"))
seq = int(c2.number_input("sequence", min_value=1, value=default_seq(base.block_size), key=K + "seq"))
new_tokens = int(c2.number_input("new tokens (generate)", min_value=1, value=16, key=K + "new_tokens"))
dtype = c3.selectbox("precision", DTYPES, index=2, key=K + "dtype",
                     help="; ".join(f"{d}: {DTYPE_KEEPS[d]}" for d in DTYPES))  # fmt: skip
reduce_fp32 = c3.checkbox("reduce gradients in float32", key=K + "reduce_fp32",
                          help="bfloat16, bf16-master: 16-bit gradients reduced over data parallelism in float32")  # fmt: skip
checkpoint = c3.text_input("activation checkpointing", value="none", help="none, blocks or every-K", key=K + "ckpt")
zero = c3.multiselect("ZeRO stages", [0, 1, 2, 3], default=list(DEFAULT_ZERO_STAGES), key=K + "zero")
schedule = c4.selectbox("schedule", SCHEDULES, index=1, key=K + "schedule")
microbatches = int(c4.number_input("microbatches (0: automatic)", min_value=0, value=0, key=K + "mb",
                                   help=MICROBATCHES_HELP))  # fmt: skip
microbatch_size = int(c4.number_input("sequences a microbatch (0: not given)", min_value=0, value=0, key=K + "mbs",
                                      help=MICROBATCH_SIZE_HELP))  # fmt: skip
virtual = int(c4.number_input("virtual stages", min_value=1, value=1, key=K + "v"))
sp = c4.checkbox("sequence parallel", key=K + "sp")

st.subheader("Devices")
source = st.radio("devices", P.DEVICE_SOURCES, horizontal=True, key=K + "source", label_visibility="collapsed")
d1, d2, d3, d4 = st.columns(4)
devices = None
problem = None
try:
    if source == "known GPU":
        kind = d1.selectbox("GPU", list(KINDS), key=K + "kind")
        count = int(d2.number_input("GPUs", min_value=1, value=8, key=K + "count"))
        P.follow_kind(st.session_state, K + "per", kind)  # the kind's node, unless the user set theirs
        per = int(d3.number_input("GPUs a node", min_value=1, key=K + "per"))
        devices = preset(kind, count, per)
    elif source == "this host":
        devices = here_devices()
    elif source == "a runner's host":
        from runner.planner.devices import from_lease

        leases = [h for h in api.hosts(engine()) if h.get("gpus")]
        if not leases:
            problem = "No runner has reported GPUs (a runner's lease lists the GPUs NVML sees on its host)."
        else:
            by_host = {h["host"]: h for h in leases}  # by name: the lease read now, not one kept from a rerun before
            host = d1.selectbox("host", list(by_host), format_func=lambda h: f"{h} ({len(by_host[h]['gpus'])} GPUs)")
            devices = from_lease(by_host[host])
    elif source == "Slurm partition":
        from runner.service.cluster import Partition

        leases = [h for h in api.hosts(engine()) if h.get("cluster")]
        if not leases:
            problem = "No Slurm runner has published a partition (python -m runner serve --backend slurm ...)."
        else:
            by_host = {h["host"]: h for h in leases}
            host = d1.selectbox("partition", list(by_host),
                                format_func=lambda h: f"{by_host[h]['cluster'].get('partition', '?')} ({h})")  # fmt: skip
            kind = d2.selectbox("GPU kind of its nodes", list(KINDS), key=K + "pkind")
            devices = from_partition(Partition.from_dict(by_host[host]["cluster"]), kind)
    else:
        count = int(d1.number_input("devices", min_value=1, value=8, key=K + "dcount"))
        mem = d1.number_input("memory GiB", min_value=0.1, value=80.0, key=K + "dmem")
        tflops = d2.number_input("peak TFLOP/s (bf16)", min_value=0.001, value=989.0, key=K + "dtf")
        intra = d3.number_input("GB/s within a node", min_value=0.001, value=450.0, key=K + "dintra")
        inter = d3.number_input("GB/s between nodes", min_value=0.001, value=50.0, key=K + "dinter")
        per = int(d4.number_input("devices a node", min_value=1, value=8, key=K + "dper"))
        devices = P.devices_described(count, mem, tflops, intra, inter, per)
except (ValueError, RuntimeError) as exc:
    problem = str(exc)
if problem or devices is None:
    st.warning(problem or "No devices.")
    st.stop()
if source == "this host":
    calibrate_button(devices)
else:
    st.caption(f"{devices.describe()} · {devices.source}")
e1, e2 = st.columns(2)
if devices.measured_rate:
    efficiency = e1.slider("compute efficiency (share of the measured rate)", 0.05, 1.0, 1.0, disabled=True,
                           key=K + "eff_measured", help="calibrated CPU ranks: the rate is what one rank measured")  # fmt: skip
else:
    modelled = e1.checkbox("time matmuls by shape on the device", value=True, key=K + "modelled",
                           help="each matrix multiply timed from its shape and the GPU kind (runner/planner/devices.py); "
                           "off: every one at a flat share of peak")  # fmt: skip
    efficiency = None if modelled else e1.slider("compute efficiency (share of peak)", 0.05, 1.0, 0.5, key=K + "eff")
# A checkbox of its own for each count, with that count's default: writing the default into one shared key raced a
# fast user (an edit sent while the count's rerun ran carried the old box, and the plan ignored the box shown).
use_all = e2.checkbox(f"use every {devices.word} (else also layouts on fewer)", key=f"{K}all_{devices.count}",
                      value=uses_every_device_by_default(devices.count),
                      help="on many devices the layouts of every smaller count run to tens of thousands")  # fmt: skip

work = Workload(workload, batch, seq, new_tokens, dtype, checkpoint, schedule, microbatches, virtual, sp,
                microbatch_size=microbatch_size, reduce_fp32=reduce_fp32)  # fmt: skip
inputs = P.PlannerInputs(model, dims, work, tuple(zero) or (0,), efficiency)
problems = input_problems(inputs.config(), work, parts=dims, zero=inputs.zero_stages, efficiency=efficiency,
                          gpus=devices.count, gpus_per_node=devices.gpus_per_node)  # fmt: skip
if problems:
    st.error("\n".join(f"- {p}" for p in problems))
    st.stop()
result = P.plan(inputs.config(), work, devices, zero_stages=inputs.zero_stages, efficiency=efficiency,
                use_all=use_all)  # fmt: skip

with answer:
    best = result.best
    if best is None or best.step is None or best.memory is None:
        st.error(f"No layout of this model fits these {devices.word}s: each one's reason is listed below.")
        found = what_fits(inputs.config(), work, devices, inputs.zero_stages, efficiency, use_all)
        st.markdown(what_fits_text(found, devices.word))
    else:
        st.markdown(f"**Recommended: {P.recommendation(result)}**")
        m1, m2, m3 = st.columns(3)
        m1.metric("layout", best.layout.label())
        m2.metric("step time", human_duration(best.step.total), help="predicted: the fastest feasible layout")
        m3.metric(f"memory per {devices.word}", human_bytes(best.memory.total),
                  help=f"the predicted peak, of {human_bytes(devices.usable_bytes)} usable")  # fmt: skip
        if best.memory.notes:  # what the columns alone do not say (the gradients ZeRO-2 keeps whole, a cast copy)
            st.caption("Memory of the recommendation: " + "; ".join(best.memory.notes) + ".")
    named = f"custom {chosen.family} (from {model})" if custom else model  # the preset's name is not the model's
    st.caption(f"{named} · {workload} · batch {batch} x {seq} · {dtype} · {devices.describe()}")

st.markdown(f"**{len(result.feasible)} feasible layouts**, fastest first (★: the recommendation)")
feasible = P.feasible_table(result)
st.dataframe(feasible, hide_index=True, width="stretch", column_config=P.column_config(feasible))
with st.expander(f"{len(result.infeasible)} infeasible layouts, with the reason"):
    st.caption(f"Memory: {usable_note(devices)}.")
    infeasible = P.infeasible_table(result)
    st.dataframe(infeasible, hide_index=True, width="stretch", column_config=P.column_config(infeasible))

piped = [c for c in result.feasible if c.layout.pp > 1][:30]
if piped and work.workload == "train":
    st.subheader("Predicted pipeline timeline")
    shown = {c.layout.label(): c for c in piped}
    pick = shown[layout_choice(list(shown), K + "sim_choice")]
    sim = P.simulated_step(inputs, pick, devices)
    if sim is not None:
        st.caption(
            "Simulated from the step-time model's pass times (runner/planner/simulate.py): equal stages, "
            f"messages {sim.inputs.get('transfer', 0) * 1e3:.3g} ms; the bubble theory for this schedule is "
            f"{pick.step.bubble_fraction:.1%}. {beside_the_table(sim, pick.step)}"
        )
        width = timeline_window(sim)
        start = 0.0

        def ms(x: float) -> str:  # "2,945" and "0.75", never "1.196e+04"
            return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"

        if width is not None:
            total = sim.step_time * 1e3
            st.caption(f"{sim.m * sim.v} microbatch passes a stage are too many to read at once: {ms(width)} ms of "
                       f"the {ms(total)} ms step shown; slide through the warm-up, steady state and cool-down.")  # fmt: skip
            start = st.slider("window from (ms)", 0.0, float(f"{total - width:.4g}"), 0.0, key=K + "sim_window")
        st.altair_chart(windowed_chart(sim, start), width="stretch")

st.subheader("Launch a layout here")
here = devices if source == "this host" else here_devices()
if source != "this host":
    calibrate_button(here)
fitting = P.for_this_host(result, here, inputs)
if not fitting:
    st.info(f"None of these layouts fits this host ({here.describe()}).")
else:
    here_fits = {c.layout.label(): c for c in fitting}
    # The figures go beside the picker, not into its options: the browser keeps showing the option text it drew for
    # a kept choice, so figures in it would read as before the last edit.
    choice = here_fits[layout_choice(list(here_fits), K + "launch_choice")]
    st.caption(f"{choice.layout.label()}: {human_bytes(choice.memory.total)} a {here.word}, "
               f"{human_duration(choice.step.total)} a step, predicted here")  # fmt: skip
    steps = int(st.number_input("steps", min_value=1, value=5, key=K + "steps"))
    if st.button("Launch this layout", type="primary", key=K + "launch"):
        try:
            run_id = P.launch(engine(), inputs, choice, here, steps)
        except SpecError as exc:
            st.error("; ".join(str(p) for p in exc.problems))
        else:
            st.success(P.launched_text(run_id), icon=":material/rocket_launch:")

with st.expander("The guide's example: GPT-3 175B on 512 80-GiB GPUs, and the planner's best of them"):
    st.caption(
        "Training with 1536 sequences of 2048 a step (GPT-3's 3.2M tokens), bf16-mixed, every block checkpointed, "
        "1F1B with microbatches of one sequence; 512 H100 80GB, 8 a node."
    )
    st.dataframe(
        P.guide_table()[["layout", "note", "fits", "step s", "GiB per GPU", "bubble", "comm s", "why not"]],
        hide_index=True,
        width="stretch",
    )
