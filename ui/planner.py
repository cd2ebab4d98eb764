"""The Planner page's logic (pages/planner.py stays thin): inputs to a plan, its tables, the guide's 175B example,
and launching a recommended layout that fits here, tagged with its prediction.

No Streamlit here, so every piece is tested directly (tests/test_planner_ui.py). Launching goes through
runner.api.submit like any run (validated first); the run gets the tag "plan" and its prediction is stored in
`plan_predictions` (storage/calibration.py), which `predicted_vs_measured` sets beside the run's own figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from runner.gpt.config import PRESETS
from runner.planner.devices import Devices, described, preset
from runner.planner.layouts import GUIDE_175B_WORK, GUIDE_LAYOUTS, Candidate, Plan, evaluate, on_devices, plan
from runner.planner.memory import rank_memory
from runner.planner.models import MODELS, GiB, Layout, Workload, with_dims
from runner.spec.run_spec import RunSpec
from ui.format import human_bytes

DEVICE_SOURCES = ("known GPU", "this host", "a runner's host", "Slurm partition", "described")
PLAN_TAG = "plan"


@dataclass(frozen=True)
class PlannerInputs:
    """Everything the page asks: the model, the workload, the options, and where the devices come from."""

    model: str = "gpt2"
    dims: dict[str, int | None] = field(default_factory=dict)
    work: Workload = field(default_factory=Workload)
    zero_stages: tuple[int, ...] = (0,)
    efficiency: float | None = None  # a flat share of peak, or None: matmuls timed by shape (step_time.py)

    def config(self):
        return with_dims(MODELS[self.model], **self.dims)


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


def _row(c: Candidate, unit: tuple[str, int] = ("GiB", GiB)) -> dict[str, Any]:
    m, s = c.memory, c.step
    u, div = unit
    row: dict[str, Any] = {"layout": c.layout.label(), "tp": c.layout.tp, "pp": c.layout.pp, "dp": c.layout.dp,
                           "ZeRO": c.layout.zero_stage, "microbatches": c.microbatches}  # fmt: skip
    if m is not None:
        row |= {
            f"{u} per GPU": round(m.total / div, 2),
            f"params {u}": round(m.param_bytes / div, 2),
            f"grads {u}": round(m.grad_bytes / div, 2),
            f"optimizer {u}": round(m.optimizer_bytes / div, 2),
            f"activations {u}": round(m.activation_bytes / div, 2),
            f"KV cache {u}": round(m.kv_cache_bytes / div, 2),
            f"transient {u}": round(m.transient_bytes / div, 2),
            "peak at": m.peak_at,  # why the total is not the sum: gradients and transients come and go
        }
    if s is not None:
        row |= {
            "step s": round(s.total, 4),
            "compute s": round(s.compute_s, 4),
            "bubble": round(s.bubble_fraction, 3),
            "comm s": round(s.tp_comm_s + s.pp_comm_s + s.dp_comm_s, 4),
        }
    return row


def feasible_table(p: Plan) -> pd.DataFrame:
    """The feasible layouts, fastest first, with predicted memory per GPU and step time by part."""
    unit = memory_unit(p.feasible + p.infeasible)
    return pd.DataFrame([_row(c, unit) for c in p.feasible], columns=None if p.feasible else ["layout"])


def infeasible_table(p: Plan) -> pd.DataFrame:
    """The infeasible layouts with every reason."""
    unit = memory_unit(p.feasible + p.infeasible)
    rows = [{**_row(c, unit), "why not": "; ".join(c.reasons)} for c in p.infeasible]
    return pd.DataFrame(rows, columns=None if rows else ["layout", "why not"])


def guide_table(devices: Devices | None = None) -> pd.DataFrame:
    """The guide's GPT-3 175B layouts (8-way pipeline x 4-way tensor x 16-way data and others) on 512 80-GiB
    GPUs: predicted memory per GPU, step time, whether each fits and why not."""
    devices = devices or guide_devices()
    cfg = MODELS["gpt3-175b"]
    rows = []
    for lay in GUIDE_LAYOUTS:
        c = evaluate(cfg, lay, GUIDE_175B_WORK, devices)
        rows.append({**_row(c), "fits": c.feasible, "why not": "; ".join(c.reasons)})
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
    dims = {k: v for k, v in cfg.to_dict().items() if k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")}
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
    if strategy == "tensor" and work.sequence_parallel:
        values["sequence_parallel"] = True
    return RunSpec(**values)


def fits_here(c: Candidate, here: Devices, inputs: PlannerInputs) -> list[str]:
    """Why candidate `c` cannot run on this host's devices ([] when it can)."""
    judged = evaluate(inputs.config(), c.layout, inputs.work, here, inputs.efficiency)
    return list(judged.reasons)


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
    """Submit candidate `c` as a run on this host (validated by api.submit), store its prediction, return its id."""
    from runner import api
    from storage.calibration import store_prediction

    device = "cpu" if here.is_cpu else "cuda"
    spec = spec_for(inputs, c, device, steps)
    run_id = api.submit(engine, spec)
    store_prediction(engine, run_id, prediction_record(inputs, c, here))
    return run_id


def predicted_vs_measured(prediction: dict[str, Any], ranks: list[dict[str, Any]],
                          step_time_s: float | None = None) -> pd.DataFrame:  # fmt: skip
    """Per rank: predicted against measured parameter, optimizer and gradient bytes, the activations autograd saved
    at the peak (the engine's own count), the rank's whole memory (the prediction's total against the run's measured
    tensor peak, `peak_tensor_bytes`: CUDA's max_memory_allocated, or on a CPU the profiler's count of a step's
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
    out["ratio"] = ["—" if x is None or x != x else f"{x:.3f}" for x in table.ratio]
    out["rank"] = ["all" if x is None or x != x else str(int(x)) for x in table["rank"]]
    return out


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
