"""Planner page: which tp x pp x dp (x ZeRO) layout for a model on some devices, predicted; the guide's GPT-3 175B
example answered; a recommended layout that fits this host launched with its prediction. Logic: ui/planner.py."""

from __future__ import annotations

import streamlit as st

from runner import api
from runner.planner.devices import KINDS, from_partition, preset
from runner.planner.inputs import input_problems
from runner.planner.models import MODELS, GiB, Workload
from runner.spec.run_spec import DTYPE_KEEPS, DTYPES, SCHEDULES, WORKLOADS, SpecError
from ui import planner as P
from ui.state import engine, enter_through_app

enter_through_app()

K = "planner_"
st.title("Planner")
st.caption(
    "Memory per GPU: parameters, gradients, AdamW state (ZeRO per Rajbhandari et al. 2020), activations of the "
    "microbatches in flight (Korthikanti et al. 2022), KV cache. Step time: each matmul timed by its shape on the "
    "device kind (or at a stated share of peak), bytes over the link each group crosses, the schedule's bubble, "
    "data-parallel reductions overlapped as the engine does. Formulas: runner/planner/memory.py, step_time.py."
)

with st.expander("The guide's example: GPT-3 175B on 512 80-GiB GPUs", expanded=True):
    st.caption(
        "Training with 1536 sequences of 2048 a step (GPT-3's 3.2M tokens), bf16-mixed, every block checkpointed, "
        "1F1B with microbatches of one sequence; 512 H100 80GB, 8 a node."
    )
    st.dataframe(
        P.guide_table()[["layout", "fits", "GiB per GPU", "step s", "bubble", "comm s", "why not"]],
        hide_index=True,
        width="stretch",
    )

st.subheader("Your plan")
c1, c2, c3, c4 = st.columns(4)
model = c1.selectbox("model", list(MODELS), index=list(MODELS).index("gpt2"), key=K + "model")
base = MODELS[model]
custom = c1.checkbox("custom dimensions", key=K + "custom")
dims = {}
if custom:
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        dims[name] = int(c1.number_input(name, min_value=1, value=getattr(base, name), key=K + name))
workload = c2.selectbox("workload", WORKLOADS, index=2, key=K + "workload")
batch = int(c2.number_input("global batch", min_value=1, value=8, key=K + "batch"))
seq = int(c2.number_input("sequence", min_value=1, value=min(1024, base.block_size), key=K + "seq"))
new_tokens = int(c2.number_input("new tokens (generate)", min_value=1, value=16, key=K + "new_tokens"))
dtype = c3.selectbox("precision", DTYPES, index=2, key=K + "dtype",
                     help="; ".join(f"{d}: {DTYPE_KEEPS[d]}" for d in DTYPES))  # fmt: skip
checkpoint = c3.text_input("activation checkpointing", value="none", help="none, blocks or every-K", key=K + "ckpt")
zero = c3.multiselect("ZeRO stages", [0, 1, 2, 3], default=[0, 1], key=K + "zero")
schedule = c4.selectbox("schedule", SCHEDULES, index=1, key=K + "schedule")
microbatches = int(c4.number_input("microbatches (0: one sequence each)", min_value=0, value=0, key=K + "mb"))
virtual = int(c4.number_input("virtual stages", min_value=1, value=1, key=K + "v"))
sp = c4.checkbox("sequence parallel", key=K + "sp")
modelled = c4.checkbox("time matmuls by shape on the device", value=True, key=K + "modelled",
                       help="each matrix multiply timed from its shape and the GPU kind (runner/planner/devices.py); "
                       "off: every one at a flat share of peak")  # fmt: skip
efficiency = None if modelled else c4.slider("compute efficiency (share of peak)", 0.05, 1.0, 0.5, key=K + "eff")

st.markdown("**Devices**")
source = st.radio("devices", P.DEVICE_SOURCES, horizontal=True, key=K + "source", label_visibility="collapsed")
d1, d2, d3, d4 = st.columns(4)
devices = None
problem = None
try:
    if source == "known GPU":
        kind = d1.selectbox("GPU", list(KINDS), key=K + "kind")
        count = int(d2.number_input("GPUs", min_value=1, value=8, key=K + "count"))
        per = int(d3.number_input("GPUs a node", min_value=1, value=KINDS[kind].gpus_per_node, key=K + "per"))
        devices = preset(kind, count, per)
    elif source == "this host":
        from runner.planner.calibrate import this_host_devices

        devices = this_host_devices(engine())
    elif source == "a runner's host":
        from runner.planner.devices import from_lease

        leases = [h for h in api.hosts(engine()) if h.get("gpus")]
        if not leases:
            problem = "No runner has reported GPUs (a runner's lease lists the GPUs NVML sees on its host)."
        else:
            lease = d1.selectbox("host", leases, format_func=lambda h: f"{h['host']} ({len(h['gpus'])} GPUs)")
            devices = from_lease(lease)
    elif source == "Slurm partition":
        from runner.service.cluster import Partition

        leases = [h for h in api.hosts(engine()) if h.get("cluster")]
        if not leases:
            problem = "No Slurm runner has published a partition (python -m runner serve --backend slurm ...)."
        else:
            host = d1.selectbox("partition", leases, format_func=lambda h: h["cluster"].get("partition", "?"))
            kind = d2.selectbox("GPU kind of its nodes", list(KINDS), key=K + "pkind")
            devices = from_partition(Partition.from_dict(host["cluster"]), kind)
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
st.caption(f"{devices.describe()} · {devices.source}")
use_all = st.checkbox("use every device (else also layouts on fewer)", value=devices.count > 8, key=K + "all")

work = Workload(workload, batch, seq, new_tokens, dtype, checkpoint, schedule, microbatches, virtual, sp)
inputs = P.PlannerInputs(model, dims, work, tuple(zero) or (0,), efficiency)
problems = input_problems(inputs.config(), work, zero=inputs.zero_stages, efficiency=efficiency, gpus=devices.count)
if problems:
    st.error("\n".join(f"- {p}" for p in problems))
    st.stop()
result = P.plan(inputs.config(), work, devices, zero_stages=inputs.zero_stages, efficiency=efficiency,
                use_all=use_all)  # fmt: skip

st.markdown(f"**{len(result.feasible)} feasible layouts**, fastest first")
st.dataframe(P.feasible_table(result), hide_index=True, width="stretch")
with st.expander(f"{len(result.infeasible)} infeasible layouts, with the reason"):
    st.dataframe(P.infeasible_table(result), hide_index=True, width="stretch")

piped = [c for c in result.feasible if c.layout.pp > 1][:30]
if piped and work.workload == "train":
    st.subheader("Predicted pipeline timeline")
    from ui.simulated import simulated_chart

    pick = st.selectbox("layout", piped, format_func=lambda c: c.layout.label(), key=K + "sim_choice")
    sim = P.simulated_step(inputs, pick, devices)
    if sim is not None:
        st.caption(
            "Simulated from the step-time model's pass times (runner/planner/simulate.py): equal stages, "
            f"messages {sim.inputs.get('transfer', 0) * 1e3:.3g} ms; the bubble theory for this schedule is "
            f"{pick.step.bubble_fraction:.1%}."
        )
        st.altair_chart(simulated_chart(sim), width="stretch")

st.subheader("Launch a layout here")
from runner.planner.calibrate import this_host_devices  # noqa: E402 -- only once a plan exists

here = this_host_devices(engine())
fitting = [c for c in result.feasible if not P.fits_here(c, here, inputs)]
if not fitting:
    st.info(f"None of these layouts fits this host ({here.describe()}).")
    st.stop()
choice = st.selectbox("layout", fitting, format_func=lambda c: f"{c.layout.label()} · {c.memory.total / GiB:.2f} GiB "
                      f"· {c.step.total:.3g} s predicted", key=K + "launch_choice")  # fmt: skip
steps = int(st.number_input("steps", min_value=1, value=5, key=K + "steps"))
if st.button("Launch this layout", type="primary", key=K + "launch"):
    try:
        run_id = P.launch(engine(), inputs, choice, here, steps)
    except SpecError as exc:
        st.error("; ".join(str(p) for p in exc.problems))
    else:
        st.success(f"Run #{run_id} queued, tagged '{P.PLAN_TAG}' with its prediction; Compare shows both.")
