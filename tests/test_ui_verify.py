"""ui/verify.py: the job's verdict read as pass / fail / off / no verdict, and the differences beside the
tolerances that judged them (runs stored before verdicts keep their numbers but get no verdict)."""

from __future__ import annotations

from ui.verify import FAIL, NO_VERDICT, OFF, PASS, differences, tolerance_text, verdict

FAILED = {
    "passed": False, "dtype": "float32",
    "tolerances": {"logits": 1e-5, "loss": 1e-5, "grads": 1e-5, "weights": 1e-6},
    "failures": ["grads: max rel diff 3.1e-02 > 1e-05"],
    "logits_max_abs_diff": 2e-7, "logits_max_rel_diff": 4e-7, "loss_abs_diff": 0.0, "loss_rel_diff": 0.0,
    "grads_max_abs_diff": 0.01, "grads_max_rel_diff": 0.031, "weights_max_abs_diff": 3e-8, "tokens_equal": None,
}  # fmt: skip
LEGACY = {"logits_max_abs_diff": 0.0, "loss_abs_diff": 0.0, "grads_max_abs_diff": 1e-7, "tokens_equal": None}


def test_verdicts():
    assert verdict(None) == OFF
    assert verdict({**FAILED, "passed": True}) == PASS
    assert verdict(FAILED) == FAIL
    assert verdict(LEGACY) == NO_VERDICT  # stored before verdicts: never read as a pass


def test_differences_list_abs_rel_and_the_tolerance_of_each_quantity():
    table = differences(FAILED).set_index("quantity")
    assert list(table.index) == ["logits", "loss", "gradients", "updated weights"]
    assert table.loc["gradients"].tolist() == ["1.0e-02", "3.1e-02", "max rel diff ≤ 1e-05"]
    # the weights are judged by their absolute difference: the relative one says so instead of 'None'
    assert table.loc["updated weights"].tolist() == ["3.0e-08", "n/a: judged by max abs diff", "max abs diff ≤ 1e-06"]
    assert tolerance_text(FAILED) == "logits rel ≤ 1e-05, loss rel ≤ 1e-05, grads rel ≤ 1e-05, weights abs ≤ 1e-06 (compared in float32)"  # fmt: skip


def test_a_forward_run_has_no_gradient_row_and_a_generate_run_says_whether_tokens_match():
    forward = {**FAILED, "grads_max_abs_diff": None, "grads_max_rel_diff": None, "weights_max_abs_diff": None}
    assert list(differences(forward)["quantity"]) == ["logits", "loss"]
    generate = {"passed": False, "logits_max_abs_diff": 1e-6, "tokens_equal": False}
    assert differences(generate)["bound"].tolist() == ["—", "must match: they DIFFER"]
    # the bounds named are those of what was compared: a forward has no gradients, a generate no loss either
    assert tolerance_text(forward) == "logits rel ≤ 1e-05, loss rel ≤ 1e-05 (compared in float32)"
    generated = {**generate, "logits_max_rel_diff": 1e-6, "tolerances": FAILED["tolerances"]}
    assert tolerance_text(generated) == "logits rel ≤ 1e-05"


def test_a_legacy_verify_shows_its_numbers_without_tolerances():
    table = differences(LEGACY)
    assert list(table.columns) == ["quantity", "max abs diff"]
    assert table["max abs diff"].tolist() == ["0.0e+00", "0.0e+00", "1.0e-07"]
    assert tolerance_text(LEGACY) == ""
