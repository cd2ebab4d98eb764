"""The Planner page's logic (pages/planner.py stays thin): inputs to a plan, its tables, the guide's 175B example,
and launching a recommended layout that fits here, tagged with its prediction.

No Streamlit here, so every piece is tested directly (tests/test_planner_ui.py). Launching goes through
runner.api.submit like any run (validated first); the run gets the tag "plan" and its prediction is stored in
`plan_predictions` (storage/calibration.py), which `predicted_vs_measured` sets beside the run's own figures.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from runner.gpt.config import PRESETS
from runner.planner.devices import KINDS, Devices, described, efficiency_on, preset
from runner.planner.layouts import (
    GUIDE_175B_WORK,
    GUIDE_LAYOUTS,
    STEP_NOTE,
    Candidate,
    Plan,
    evaluate,
    on_devices,
    plan,
)
from runner.planner.memory import rank_memory
from runner.planner.models import MODELS, GiB, Layout, Workload, with_dims
from runner.spec.run_spec import MODEL_FIELDS, RunSpec
from ui.format import human_bytes, human_duration

DEVICE_SOURCES = ("known GPU", "this host", "a runner's host", "Slurm partition", "described")
PLAN_TAG = "plan"


@dataclass(frozen=True)
class PlannerInputs:
    """Everything the page asks: the model, the workload, the options, and where the devices come from."""

    model: str = "gpt2"
    dims: dict[str, Any] = field(default_factory=dict)
    work: Workload = field(default_factory=Workload)
    zero_stages: tuple[int, ...] = (0,)
    efficiency: float | None = None  # a flat share of peak, or None: matmuls timed by shape (step_time.py)

    def config(self):
        return with_dims(MODELS[self.model], **self.dims)


def follow_kind(state: MutableMapping[str, Any], key: str, kind: str) -> None:
    """Keep the "GPUs a node" field `key` (in Streamlit's session state) on the GPU kind's usual node: set when first
    shown and when the kind changes, unless the user changed it from the last kind's node (theirs stays). The kind
    it follows is kept under key + "_kind"."""
    last = state.get(key + "_kind")
    usual = KINDS[last].gpus_per_node if last in KINDS else None
    if key not in state or (last != kind and state[key] == usual):
        state[key] = KINDS[kind].gpus_per_node
    state[key + "_kind"] = kind


def guide_inputs() -> PlannerInputs:
    """The guide's example (issue 15 item 5): GPT-3 175B trained with the settings of GUIDE_175B_WORK."""
    return PlannerInputs(model="gpt3-175b", work=GUIDE_175B_WORK, zero_stages=(0, 1))


def guide_devices() -> Devices:
    """512 80-GiB GPUs, 8 a node (H100 SXM)."""
    return preset("h100-80gb", 512, 8)


def run_plan(inputs: PlannerInputs, devices: Devices) -> Plan:
    return plan(inputs.config(), inputs.work, devices, zero_stages=inputs.zero_stages, efficiency=inputs.efficiency)


def memory_unit(candidates: list[Candidate]) -> tuple[str, int]:
    """GiB for tables of real models, MiB when every layout needs less than a GiB (the lab's tiny models)."""
    biggest = max((c.memory.total for c in candidates if c.memory is not None), default=0)
    return ("GiB", GiB) if biggest >= GiB else ("MiB", 2**20)


def readable(x: float) -> float:
    """A figure rounded for reading: whole numbers from 100 (1147.3746 -> 1147), else three significant digits
    (22.1977 -> 22.2, 0.0045678 -> 0.00457)."""
    return float(round(x)) if abs(x) >= 100 else float(f"{x:.3g}")


def _row(c: Candidate, unit: tuple[str, int] = ("GiB", GiB), word: str = "GPU") -> dict[str, Any]:
    """One layout as a table row: the answer first (step time, memory per device), then how it splits and the
    parts of each figure."""
    m, s = c.memory, c.step
    u, div = unit
    row: dict[str, Any] = {"layout": c.layout.label()}
    if s is not None:
        row["step s"] = readable(s.total)
    if m is not None:
        row[f"{u} per {word}"] = readable(m.total / div)
    if s is not None:
        row |= {
            "bubble": f"{s.bubble_fraction:.1%}",
            "comm s": readable(s.tp_comm_s + s.pp_comm_s + s.dp_comm_s),
            "compute s": readable(s.compute_s),
        }
    row |= {"tp": c.layout.tp, "pp": c.layout.pp, "dp": c.layout.dp, "ZeRO": c.layout.zero_stage,
            "microbatches": c.microbatches}  # fmt: skip
    if m is not None:
        row |= {
            f"params {u}": readable(m.param_bytes / div),
            f"grads {u}": readable(m.grad_bytes / div),
            f"optimizer {u}": readable(m.optimizer_bytes / div),
            f"AdamW step {u}": readable(m.optimizer_step_bytes / div),  # the lab engine's (STEP_NOTE)
            f"activations {u}": readable(m.activation_bytes / div),
            f"KV cache {u}": readable(m.kv_cache_bytes / div),
            f"transient {u}": readable(m.transient_bytes / div),
            "peak at": m.peak_at,  # why the total is not the sum: gradients and transients come and go
        }
    return row


def feasible_table(p: Plan) -> pd.DataFrame:
    """The feasible layouts, fastest first (the first is the recommendation, marked), with predicted step time and
    memory per device, then their parts."""
    unit = memory_unit(p.feasible + p.infeasible)
    rows = [{"": "★ best" if i == 0 else "", **_row(c, unit, p.devices.word)} for i, c in enumerate(p.feasible)]
    return pd.DataFrame(rows, columns=None if rows else ["layout"])


def infeasible_table(p: Plan) -> pd.DataFrame:
    """The infeasible layouts with every reason."""
    unit = memory_unit(p.feasible + p.infeasible)
    rows = [{"layout": c.layout.label(), "why not": "; ".join(c.reasons), **_row(c, unit, p.devices.word)}
            for c in p.infeasible]  # fmt: skip
    return pd.DataFrame(rows, columns=None if rows else ["layout", "why not"])


# A column's note (by the start of its name), shown as its header's tooltip.
COLUMN_NOTES = {
    "AdamW step": "held while AdamW steps, after the backward freed the activations: " + STEP_NOTE,
    "peak at": "the moment of the step the rank holds the most; at AdamW's step that is the lab engine's own cost "
               "(AdamW step column)",
    "transient": "held at the peak during a step only: gathered ZeRO-3 units, ZB-H1's records, logits, recompute",
    "why not": "every reason the layout cannot run here; 'you have': each device's memory less its reserve (above)",
}  # fmt: skip
REASON_PX_PER_CHAR = 7  # Streamlit's 14 px table font averages about 7 px a character
REASON_PX_MAX = 1200  # wider than a wide page's table: the rest of the row would be out of sight


def column_config(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """st.dataframe's column_config for a plan's table (plain dicts, its ColumnConfig form): each column's note as
    its tooltip, and "why not" wide enough to read its longest reason whole (a table cell does not wrap)."""
    out: dict[str, dict[str, Any]] = {}
    for col in table.columns:
        note = next((n for start, n in COLUMN_NOTES.items() if str(col).startswith(start)), None)
        if note:
            out[col] = {"help": note}
    if "why not" in table.columns and len(table):
        longest = int(table["why not"].astype(str).str.len().max())
        out["why not"]["width"] = min(REASON_PX_MAX, max(200, REASON_PX_PER_CHAR * longest + 24))
    return out


def recommendation(p: Plan) -> str | None:
    """The answer in one line: the fastest layout that fits, its step time and memory per device; None when none
    fits."""
    best = p.best
    if best is None or best.step is None or best.memory is None:
        return None
    word = p.devices.word
    return (f"{best.layout.label()} on {best.layout.world_size} {word}s: step {human_duration(best.step.total)} "
            f"(bubble {best.step.bubble_fraction:.1%}), {human_bytes(best.memory.total)} per {word} of "
            f"{human_bytes(p.devices.usable_bytes)} usable")  # fmt: skip


# The guide's layouts, each with where it comes from (runner/planner/layouts.py GUIDE_LAYOUTS, in that order).
GUIDE_NOTES = ("the guide: 8-way pipeline x 4-way tensor x 16-way data", "the guide's, unsharded",
               "Megatron-LM 2021's choice for 175B-class (tp 8 within a node)", "a deeper pipeline",
               "the guide's model-parallel example: 8 GPUs of ~22B parameters each", "pure sharded data parallelism",
               "one GPU")  # fmt: skip


def guide_plan(devices: Devices | None = None) -> Plan:
    """The planner's own answer to the guide's example: every layout of the 512 GPUs (cached by the planner)."""
    inputs = guide_inputs()
    return run_plan(inputs, devices or guide_devices())


def guide_table(devices: Devices | None = None) -> pd.DataFrame:
    """The guide's GPT-3 175B layouts (8-way pipeline x 4-way tensor x 16-way data and others) on 512 80-GiB
    GPUs, and the planner's best of every layout first: predicted step time, memory per GPU, whether each fits
    and why not, and where each comes from."""
    devices = devices or guide_devices()
    cfg = MODELS["gpt3-175b"]
    best = guide_plan(devices).best
    layouts = list(zip(GUIDE_LAYOUTS, GUIDE_NOTES, strict=True))
    if best is not None:
        known = dict(layouts)
        mine = "the planner's best: the fastest that fits" + (f"; {known[best.layout]}" if best.layout in known else "")
        layouts = [(best.layout, mine)] + [(lay, note) for lay, note in layouts if lay != best.layout]
    rows = []
    for lay, note in layouts:
        c = evaluate(cfg, lay, GUIDE_175B_WORK, devices)
        rows.append({**_row(c), "fits": c.feasible, "why not": "; ".join(c.reasons), "note": note})
    return pd.DataFrame(rows)


# ---- from plan to a run ----------------------------------------------------------------------------------
def strategy_for(layout: Layout, microbatches: int) -> str:
    """The registered strategy that runs a layout: single, tensor, layer/pipeline, data, or 3d."""
    used = [d for d, n in (("tp", layout.tp), ("pp", layout.pp), ("dp", layout.dp)) if n > 1]
    if not used:
        return "single"
    if used == ["tp"]:
        return "tensor"
    if used == ["pp"]:
        return "pipeline" if microbatches > 1 else "layer"
    if used == ["dp"]:
        return "data"
    return "3d"


def spec_for(inputs: PlannerInputs, c: Candidate, device: str, steps: int = 5) -> RunSpec:
    """The RunSpec that runs candidate `c` of a plan, tagged "plan"."""
    cfg = inputs.config()
    lay, work = c.layout, inputs.work
    strategy = strategy_for(lay, c.microbatches)
    model = inputs.model if inputs.model in PRESETS else "gpt2"
    dims = {k: v for k, v in cfg.to_dict().items() if k in MODEL_FIELDS}
    base = PRESETS.get(model)
    custom = {k: v for k, v in dims.items() if base is None or getattr(base, k) != v}
    values: dict[str, Any] = {
        "strategy": strategy,
        "tp": lay.tp,
        "pp": lay.pp,
        "dp": lay.dp,
        "model": model,
        **custom,
        "workload": work.workload,
        "batch": work.batch,
        "seq": work.seq,
        "new_tokens": work.new_tokens,
        "dtype": work.dtype,
        "steps": steps,
        "device": device,
        "tags": (PLAN_TAG,),
    }
    if strategy != "layer":  # gradient accumulation without a pipeline, the pipeline's microbatches with one
        values["microbatches"] = c.microbatches
    if strategy in ("pipeline", "3d"):
        values["schedule"] = work.schedule
        if work.schedule == "interleaved-1f1b":
            values["virtual_stages"] = work.virtual_stages
    if strategy in ("data", "3d") and lay.zero_stage:
        values["zero_stage"] = lay.zero_stage
    if work.workload == "train" and work.checkpoint != "none":
        values["checkpoint"] = work.checkpoint
    if lay.tp > 1 and work.sequence_parallel:  # tensor and 3d run it; with tp 1 there is nothing to shard
        values["sequence_parallel"] = True
    if work.reduce_fp32 and lay.dp > 1 and work.workload == "train":  # what the prediction counted: dp's reductions
        values["reduce_fp32"] = True
    return RunSpec(**values)


def here_inputs(inputs: PlannerInputs, here: Devices) -> PlannerInputs:
    """The inputs a launch on this host is predicted with (runner/planner/devices.py efficiency_on: 1 on a
    measured rate, the rule `plan --this-host` follows too)."""
    return replace(inputs, efficiency=efficiency_on(here, inputs.efficiency))


def for_this_host(p: Plan, here: Devices, inputs: PlannerInputs) -> list[Candidate]:
    """The plan's feasible layouts that run on this host's devices, in the plan's order, each judged again on them
    (its step time and memory here, what a launch stores as its prediction)."""
    mine = here_inputs(inputs, here)
    judged = [evaluate(mine.config(), c.layout, mine.work, here, mine.efficiency) for c in p.feasible
              if c.layout.world_size <= here.count]  # fmt: skip
    return [c for c in judged if c.feasible]


def prediction_record(inputs: PlannerInputs, c: Candidate, devices: Devices) -> dict[str, Any]:
    """What the planner predicted for `c`: memory of every pipeline stage, step time and bubble, on `devices`."""
    cfg = inputs.config()
    work = on_devices(inputs.work, devices)
    stages = [rank_memory(cfg, c.layout, work, r).to_dict() for r in range(c.layout.pp)]
    return {
        "layout": {"tp": c.layout.tp, "pp": c.layout.pp, "dp": c.layout.dp, "zero_stage": c.layout.zero_stage},
        "microbatches": c.microbatches,
        "schedule": inputs.work.schedule,
        "virtual_stages": inputs.work.virtual_stages if inputs.work.schedule == "interleaved-1f1b" else 1,
        "stages": stages,
        "step": c.step.to_dict() if c.step else None,
        "devices": devices.to_dict(),
        "efficiency": inputs.efficiency,
    }


def launch(engine: Any, inputs: PlannerInputs, c: Candidate, here: Devices, steps: int = 5) -> int:
    """Submit candidate `c` (judged on `here`: for_this_host) as a run on this host (validated by api.submit), store
    its prediction, return its id."""
    from runner import api
    from storage.calibration import store_prediction

    device = "cpu" if here.is_cpu else "cuda"
    spec = spec_for(inputs, c, device, steps)
    run_id = api.submit(engine, spec)
    store_prediction(engine, run_id, prediction_record(here_inputs(inputs, here), c, here))
    return run_id


def launched_text(run_id: int) -> str:
    """What the page says once a layout is queued: links to the run and to Compare, which sets the prediction
    beside the measurement when the run ends."""
    return (f"Run #{run_id} queued, tagged '{PLAN_TAG}' with its prediction: [follow run #{run_id}]"
            f"(/history?run={run_id}) · [compare it with the prediction](/compare?runs={run_id}) once it ends.")  # fmt: skip


def predicted_vs_measured(prediction: dict[str, Any], ranks: list[dict[str, Any]],
                          step_time_s: float | None = None) -> pd.DataFrame:  # fmt: skip
    """Per rank: predicted against measured parameter, optimizer and gradient bytes, the activations autograd saved
    at the peak (the engine's own count), the rank's whole memory (the prediction's total against the run's measured
    tensor peak, `peak_tensor_bytes`: CUDA's max_memory_allocated less the cuBLAS workspaces (not tensors: the
    model does not predict them; the run records them beside it), or on a CPU the profiler's count of a step's
    allocations, runner/job/resources.py; runs recorded before it have none, and their resident-memory figure also
    holds the process's own, so it is not compared) and in-flight microbatches, and one row for the step time and
    bubble (what Compare shows for runs launched from a plan)."""
    rows = []
    stages = prediction.get("stages") or []
    for r in ranks:
        pp = r.get("pp") or 0
        if pp >= len(stages):
            continue
        pred = stages[pp]
        for what, key, measured_key in (("parameter bytes", "param_bytes", "param_bytes"),
                                        ("optimizer bytes", "optimizer_bytes", "optimizer_bytes"),
                                        ("gradient bytes", "grad_bytes", "grad_bytes"),
                                        ("saved activation bytes", "activation_bytes", "peak_activation_bytes"),
                                        ("memory per rank (peak)", "total", "peak_tensor_bytes")):  # fmt: skip
            measured = r.get(measured_key)
            if measured is None or key not in pred:
                continue
            rows.append({"rank": r.get("rank"), "figure": what, "predicted": pred[key], "measured": measured,
                         "ratio": pred[key] / measured if measured else None})  # fmt: skip
        if r.get("max_inflight_microbatches") is not None and len(stages) > 1:
            # the engine counts chunk-microbatches; the memory model in units of the rank's v chunks
            flight = pred["in_flight"] * (prediction.get("virtual_stages") or 1)
            rows.append({"rank": r.get("rank"), "figure": "microbatches in flight", "predicted": flight,
                         "measured": r["max_inflight_microbatches"],
                         "ratio": flight / r["max_inflight_microbatches"] if r["max_inflight_microbatches"] else None})  # fmt: skip
        if r.get("bubble_fraction") is not None and prediction.get("step"):
            predicted = prediction["step"]["bubble_fraction"]
            rows.append({"rank": r.get("rank"), "figure": "bubble", "predicted": predicted,
                         "measured": r["bubble_fraction"], "ratio": None})  # fmt: skip
    if step_time_s is not None and prediction.get("step"):
        predicted = prediction["step"]["total"]
        rows.append({"rank": None, "figure": "step time s", "predicted": predicted, "measured": step_time_s,
                     "ratio": predicted / step_time_s if step_time_s else None})  # fmt: skip
    return pd.DataFrame(rows)


def readable_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """`predicted_vs_measured` as Compare shows it: byte figures in KiB/MiB/GiB, the step time in seconds, the
    bubble as a share, ratios to three decimals (the raw numbers stay in the stored prediction and the ranks)."""

    def show(figure: str, x: Any) -> str:
        if x is None or (isinstance(x, float) and x != x):
            return "—"
        if "bytes" in figure or figure.startswith("memory"):
            return human_bytes(x)
        if figure == "step time s":
            return f"{x:.3f} s"
        if figure == "bubble":
            return f"{x:.3f}"
        return f"{x:g}"

    out = table.copy()
    for col in ("predicted", "measured"):
        out[col] = [show(f, x) for f, x in zip(table.figure, table[col], strict=True)]
    out["ratio"] = [ratio_text(f, x) for f, x in zip(table.figure, table.ratio, strict=True)]
    out["rank"] = ["all" if x is None or x != x else str(int(x)) for x in table["rank"]]
    return out.rename(columns={"ratio": "predicted / measured"})


def ratio_text(figure: str, ratio: float | None) -> str:
    """A predicted / measured ratio with its direction in words: '5.039: predicted 5.0x slower than measured',
    '0.800: predicted 20% less than measured', '1.002: as measured' (within half a percent)."""
    if ratio is None or ratio != ratio or ratio <= 0:
        return "—"
    if abs(ratio - 1) < 0.005:
        return f"{ratio:.3f}: as measured"
    more, less = ("slower", "faster") if figure == "step time s" else ("more", "less")
    if figure == "microbatches in flight":
        more, less = "more", "fewer"
    word = more if ratio > 1 else less
    if 0.5 < ratio < 2:
        return f"{ratio:.3f}: predicted {abs(ratio - 1):.0%} {word} than measured"
    return f"{ratio:.3f}: predicted {max(ratio, 1 / ratio):.1f}x {word} than measured"


def devices_described(count: int, memory_gib: float, tflops: float, bw_intra: float, bw_inter: float,
                      gpus_per_node: int) -> Devices:  # fmt: skip
    return described(count, memory_gib, tflops, bw_intra, bw_inter, gpus_per_node)


def plan_comparisons(engine: Any, run_ids: list[int]) -> dict[int, pd.DataFrame]:
    """For each of `run_ids` launched from a plan: its prediction against its measured per-rank figures and
    median step time (what pages/compare.py shows); runs without a prediction are left out."""
    from runner import api
    from storage.calibration import predictions

    preds = predictions(engine, run_ids)
    if not preds:
        return {}
    ranks = api.rank_results(engine, list(preds))
    out = {}
    for run_id, pred in preds.items():
        mine = ranks[ranks.run_id == run_id] if not ranks.empty else ranks
        records = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}  # NaN -> None
                   for r in mine.to_dict("records")]  # fmt: skip
        run = api.get_run(engine, run_id) or {}
        out[run_id] = predicted_vs_measured(pred, records, (run.get("result") or {}).get("step_time_s_p50"))
    return out


def simulated_step(inputs: PlannerInputs, c: Candidate, devices: Devices) -> Any:
    """The planner's predicted pipeline timeline of candidate `c` (H-sim's runner/planner/simulate.py), from the
    step-time model's per-microbatch pass times: one stage's share of a microbatch's training FLOPs at the stated
    efficiency, forward a third, backward two thirds (with the recomputed forward under checkpointing; zb-h1
    splits it into B and W of a third each), a message b*s*h at the pipeline's link; equal stages (the LM head's
    extra work on the last stage is left out). None when there is no pipeline or no training."""
    from runner.planner.simulate import simulate
    from runner.planner.step_time import DEFAULT_LINK_EFFICIENCY, message_bandwidth, step_flops

    lay, work = c.layout, inputs.work
    if lay.pp < 2 or work.workload != "train" or c.step is None:
        return None
    v = work.chunks_for(lay)
    m = c.microbatches
    rate = devices.peak(work.dtype) * (inputs.efficiency or c.step.efficiency)  # (modelled: the share it reached)
    plain = step_flops(inputs.config(), replace(work, checkpoint="none"))
    recompute = step_flops(inputs.config(), work) - plain
    per_pass = plain / 3 / (lay.dp * m) / (lay.pp * v * lay.tp) / rate  # one forward of one chunk
    extra = recompute / (lay.dp * m) / (lay.pp * v * lay.tp) / rate
    mb = max(1, work.batch // lay.dp // m)
    bw = message_bandwidth(devices, lay.tp, lay.dp, DEFAULT_LINK_EFFICIENCY)
    transfer = mb * work.seq * inputs.config().n_embd * work.residual_width / bw
    if work.schedule == "zb-h1":
        return simulate(work.schedule, lay.pp, m, per_pass, per_pass + extra, per_pass, transfer, v)
    return simulate(work.schedule, lay.pp, m, per_pass, 2 * per_pass + extra, 0.0, transfer, v)
