"""ui/forms.py: form values become a RunSpec, unused degrees go neutral, problems are keyed by the field they concern."""

from __future__ import annotations

import pytest

from runner.spec.run_spec import RunSpec
from runner.spec.strategies import NEUTRAL, OPTIONS, get_strategy, strategy_names
from runner.spec.validation import validate_spec
from ui.forms import STRATEGY_HELP, oversubscription_warning, problems_by_field, spec_from_form, uses

FORM = {"strategy": "layer", "tp": 2, "pp": 2, "dp": 2, "microbatches": 4, "model": "tiny", "workload": "train",
        "batch": 8, "seq": 64, "steps": 5, "warmup": 1, "tags": "a, b", "weights": ""}  # fmt: skip


def test_form_sets_unused_degrees_neutral_so_they_never_nag():
    spec, problems = spec_from_form(FORM)
    assert problems == []
    assert (spec.tp, spec.pp, spec.dp, spec.microbatches) == (1, 2, 1, 1)
    assert spec.tags == ("a", "b") and spec.weights is None


def test_form_problems_are_keyed_by_field_and_shown_at_once():
    _, problems = spec_from_form({**FORM, "pp": 3, "batch": 0})
    by_field = problems_by_field(problems)
    assert set(by_field) == {"batch", "pp"}  # the layer split reads neither batch nor anything else refused
    assert "needs n_layer divisible by 3" in by_field["pp"][0]
    # Every problem at once, even beside a seed the form cannot read: a user fixes them in one pass, not four.
    _, problems = spec_from_form({**FORM, "seed": "abc", "batch": 0, "steps": 0, "warmup": -1, "time_limit_s": 0,
                                  "seq": 1000, "data": "/nonexistent"})  # fmt: skip
    assert set(problems_by_field(problems)) == {"seed", "batch", "steps", "warmup", "time_limit_s", "seq", "data"}
    # but a check that reads a refused field waits for it: no batch-against-dp verdict on a batch of 0
    _, problems = spec_from_form({**FORM, "strategy": "data", "dp": 3, "batch": 0})
    assert problems_by_field(problems) == {"batch": ["must be at least 1 (got 0)"]}


def test_a_3d_split_keeps_every_degree_and_checks_the_batch_against_dp_and_microbatches():
    spec, problems = spec_from_form(
        {**FORM, "strategy": "3d", "tp": 2, "pp": 2, "dp": 2, "microbatches": 2, "batch": 8}
    )
    assert problems == [] and (spec.tp, spec.pp, spec.dp, spec.microbatches) == (2, 2, 2, 2)
    _, problems = spec_from_form({**FORM, "strategy": "3d", "dp": 2, "microbatches": 4, "batch": 6})
    assert {"batch", "microbatches"} & set(problems_by_field(problems))


def test_custom_dims_only_count_for_a_custom_model():
    spec, problems = spec_from_form({**FORM, "n_layer": 7})
    assert problems == [] and spec.n_layer is None
    _, problems = spec_from_form({**FORM, "model": "custom", "n_layer": 3, "n_head": 4, "n_embd": 64,
                                  "vocab_size": 100, "block_size": 64})  # fmt: skip
    assert "pp" in problems_by_field(problems)


def test_gpu_count_reaches_validation():
    _, problems = spec_from_form({**FORM, "device": "cuda", "_gpu_count": 0})
    assert "device" in problems_by_field(problems)


def test_malformed_values_come_back_as_problems_not_exceptions():
    spec, problems = spec_from_form({**FORM, "strategy": "zero", "batch": 1.5})
    assert spec is None and problems


def test_every_strategy_has_help_and_a_field_set():
    assert list(STRATEGY_HELP) == list(strategy_names())
    assert all(STRATEGY_HELP[name] == get_strategy(name).help and STRATEGY_HELP[name].strip() for name in STRATEGY_HELP)
    assert uses("pipeline", "microbatches") and not uses("layer", "microbatches") and not uses("nope", "tp")
    assert uses("3d", "sequence_parallel") and not uses("data", "sequence_parallel")


# A value other than the neutral one for each field that has one, and a valid one for each choice.
OTHER = {"tp": 2, "pp": 2, "dp": 2, "microbatches": 2, "sequence_parallel": True, "schedule": "gpipe",
         "tp_style": "gather", "virtual_stages": 2, "zero_stage": 1}  # fmt: skip
# What a used option needs beside it to be valid: virtual stages the interleaved schedule over 2 stages, ZeRO 2 replicas,
# sequence parallelism a tp group to shard over.
NEEDS = {"virtual_stages": {"schedule": "interleaved-1f1b", "pp": 2, "microbatches": 2}, "zero_stage": {"dp": 2},
         "sequence_parallel": {"tp": 2}}  # fmt: skip
FIELDS = ("tp", "pp", "dp", *OPTIONS)


@pytest.mark.parametrize("strategy", strategy_names())
@pytest.mark.parametrize("field", FIELDS)
def test_the_form_offers_a_field_iff_the_strategy_uses_it_and_the_spec_refuses_unused_values(strategy, field):
    """A property over the registry: the form's enabled fields and the spec's refusals are the same facts."""
    s = get_strategy(strategy)
    assert uses(strategy, field) == s.uses(field) == (field in s.degrees or field in s.options)
    if field not in NEUTRAL:
        return  # schedule and tp_style have no neutral value: a strategy that does not use them ignores them
    base = {"strategy": strategy, **s.min_degree}
    assert validate_spec(RunSpec(**base)) == []
    problems = validate_spec(RunSpec(**{**base, field: OTHER[field]}))
    if s.uses(field):  # used: a non-neutral value is the point, and is accepted (with what it needs)
        base = {**base, **NEEDS.get(field, {})}
        problems = validate_spec(RunSpec(**{**base, field: OTHER[field]}))
        assert problems == []
        spec, form_problems = spec_from_form({**FORM, **base, field: OTHER[field]})
        assert form_problems == [] and getattr(spec, field) == OTHER[field]
    else:  # unused: the spec refuses it, naming the field; the form never sends it
        assert [p.field for p in problems] == [field]
        assert f"strategy '{strategy}' does not use {field}" in problems[0].message
        spec, form_problems = spec_from_form({**FORM, **base, field: OTHER[field]})
        assert form_problems == [] and getattr(spec, field) == NEUTRAL[field]


def test_neutral_values_are_the_spec_defaults():
    assert {name: getattr(RunSpec(), name) for name in NEUTRAL} == NEUTRAL


def test_oversubscription_is_judged_only_for_runs_that_land_on_cpu():
    spec, _ = spec_from_form({**FORM, "pp": 4})
    assert oversubscription_warning(spec, gpu_count=0, cores=2).startswith("4 ranks on 2 CPU cores")
    assert oversubscription_warning(spec, gpu_count=0, cores=4) is None
    assert oversubscription_warning(spec, gpu_count=4, cores=2) is None  # 'auto' with 4 GPUs runs on them
    assert oversubscription_warning(spec, gpu_count=None, cores=2) is None  # no runner report: device unknown
    on_cpu, _ = spec_from_form({**FORM, "pp": 4, "device": "cpu"})
    assert oversubscription_warning(on_cpu, gpu_count=None, cores=2) is not None


def test_the_repeat_note_says_what_k_runs_can_tell():
    from ui.forms import repeat_note

    assert repeat_note(1) is None
    # 3 runs: min..max covers the median with 1 - 2/8 = 75%; 4 of each resolve two specs (1 - 2/70 = 97%).
    assert "75% confidence (their min..max; 6 runs reach 95%)" in repeat_note(3)
    assert "4 runs of each are needed" in repeat_note(3)
    assert "97% confidence;" in repeat_note(6) and "can be resolved at 95%" in repeat_note(6)


def test_a_prompt_sets_seq_to_its_tokens_and_is_refused_where_the_data_reads_no_text():
    spec, problems = spec_from_form({**FORM, "workload": "generate", "data": "stdlib", "prompt": "import os"})
    assert problems == [] and spec.seq == 9 and spec.prompt == "import os"
    _, problems = spec_from_form({**FORM, "workload": "generate", "prompt": "import os"})
    assert "synthetic tokens are no text" in problems_by_field(problems)["prompt"][0]
