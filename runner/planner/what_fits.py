"""What would fit when no layout does: the same plan again with one memory-saving setting changed at a time, then
all of them together, and the fastest layout each change makes fit (torch-free; the CLI and the Planner page).

The settings are the ones the planner already counts, each saving a different part of a rank's memory: microbatches
of one sequence (gradients accumulated: the activations of one sequence, not of a replica's whole batch), every
block checkpointed (a block's input kept, not its activations), sequence parallelism (the activations outside the
tensor-parallel regions split over tp), bf16-master (2 + 2 + 12 bytes a parameter, float32 weights not kept beside
their bfloat16 copies) and ZeRO up to stage 3 (the optimizer state, gradients and parameters sharded over dp).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from runner.gpt.config import GPTConfig
from runner.planner.devices import Devices
from runner.planner.layouts import Candidate, plan
from runner.planner.models import Workload

ALL_ZERO = (0, 1, 2, 3)


@dataclass(frozen=True)
class Change:
    """One setting changed: its words (as the fields are named, on the page and the CLI alike), the workload fields
    it sets, and the ZeRO stages it plans (None: those asked)."""

    words: str
    fields: dict[str, Any] = field(default_factory=dict)
    zero_stages: tuple[int, ...] | None = None


def changes(work: Workload, zero_stages: tuple[int, ...]) -> list[Change]:
    """The memory-saving settings `work` does not use yet, one at a time (module docstring)."""
    train = work.workload == "train"
    out = []
    if train and work.microbatch_size != 1:
        out.append(Change("microbatch_size 1", {"microbatch_size": 1, "microbatches": 0}))
    if train and work.checkpoint != "blocks":
        out.append(Change("checkpoint blocks", {"checkpoint": "blocks"}))
    if not work.sequence_parallel:
        out.append(Change("sequence_parallel", {"sequence_parallel": True}))
    if train and work.dtype in ("float32", "bf16-mixed"):
        out.append(Change("dtype bf16-master", {"dtype": "bf16-master"}))
    if train and tuple(sorted(zero_stages)) != ALL_ZERO:
        out.append(Change("ZeRO stages 0-3", zero_stages=ALL_ZERO))
    return out


def what_fits(cfg: GPTConfig, work: Workload, devices: Devices, zero_stages: tuple[int, ...],
              efficiency: float | None = None, use_all: bool = True) -> list[tuple[str, Candidate]]:  # fmt: skip
    """(the change, the fastest layout it makes fit) for each single change that makes one fit; where none does
    alone, all of them together, if that does. Empty where nothing the planner counts would fit the model."""
    options = changes(work, zero_stages)
    found = []
    for change in options:
        best = plan(cfg, replace(work, **change.fields), devices, change.zero_stages or zero_stages, efficiency,
                    use_all).best  # fmt: skip
        if best is not None:
            found.append((change.words, best))
    if found or len(options) < 2:
        return found
    together = replace(work, **{k: v for c in options for k, v in c.fields.items()})
    stages = ALL_ZERO if any(c.zero_stages for c in options) else zero_stages
    best = plan(cfg, together, devices, stages, efficiency, use_all).best
    return [(", ".join(c.words for c in options), best)] if best is not None else []


def what_fits_text(found: list[tuple[str, Candidate]], word: str) -> str:
    """One line a change: "checkpoint blocks: tp2 pp4 dp8 zero1, step 135 s, 63.4 GiB per GPU"; or why nothing."""
    if not found:
        return (f"Nothing the planner counts makes a layout fit: more {word}s, a shorter sequence or a smaller batch "
                "a step are left.")  # fmt: skip
    lines = [f"What would fit ({len(found)} change{'s' if len(found) > 1 else ''}, the fastest layout each makes fit):"]
    for words, c in found:
        assert c.step is not None and c.memory is not None
        lines.append(f"- {words}: {c.layout.label()}, step {c.step.total:.3g} s, "
                     f"{c.memory.total / 2**30:.1f} GiB per {word}")  # fmt: skip
    return "\n".join(lines)
