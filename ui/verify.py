"""The verify result as people read it: a verdict (pass, fail, off, or none for runs recorded before verdicts)
and the differences against the single-device reference beside the tolerances they were judged by.

The verdict itself is the job's (`verify["passed"]`, with its `failures`); nothing here re-judges numbers.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

PASS, FAIL, OFF, NO_VERDICT = "pass", "fail", "off", "no verdict"

# (label, abs key, rel key, tolerance key): the quantities verify compares, in the order a reader checks them.
QUANTITIES = (
    ("logits", "logits_max_abs_diff", "logits_max_rel_diff", "logits"),
    ("loss", "loss_abs_diff", "loss_rel_diff", "loss"),
    ("gradients", "grads_max_abs_diff", "grads_max_rel_diff", "grads"),
    ("updated weights", "weights_max_abs_diff", None, "weights"),
)
# Which kind of difference each tolerance bounds (the contract: relative for logits, loss and gradients;
# absolute for the weights after one optimizer step, whose relative change is dominated by tiny weights).
TOLERANCE_KIND = {"logits": "rel", "loss": "rel", "grads": "rel", "weights": "abs"}


def verdict(verify: dict[str, Any] | None) -> str:
    """pass / fail / off (verify not run) / no verdict (a run stored before the job judged its differences)."""
    if not verify:
        return OFF
    passed = verify.get("passed")
    if passed is None:
        return NO_VERDICT
    return PASS if passed else FAIL


def list_verdict(verify: dict[str, Any] | None, status: str) -> str:
    """A run's verdict in a list of runs: pass / fail / no verdict, off for a run that succeeded without
    verifying, '—' for one still queued or running, or that failed before verifying."""
    if verify:
        return verdict(verify)
    return OFF if status == "succeeded" else "—"


def tolerance_text(verify: dict[str, Any]) -> str:
    """'logits rel ≤ 1e-05, loss rel ≤ 1e-05, …' in the dtype the comparison ran in, for the quantities the run
    compared (a generate run has no loss, gradients or update to bound); '' when none were recorded."""
    tolerances = verify.get("tolerances") or {}
    compared = {tol for _, abs_key, rel_key, tol in QUANTITIES
                if verify.get(abs_key) is not None or (rel_key and verify.get(rel_key) is not None)}  # fmt: skip
    parts = [
        " ".join(filter(None, (name, TOLERANCE_KIND.get(name), f"≤ {tol:.0e}")))
        for name, tol in tolerances.items() if name in compared or name not in TOLERANCE_KIND
    ]
    if not parts:
        return ""
    dtype = verify.get("dtype")
    return ", ".join(parts) + (f" (compared in {dtype})" if dtype else "")


def _diff(x: float | None) -> str | None:
    return None if x is None else f"{x:.1e}"


def differences(verify: dict[str, Any]) -> pd.DataFrame:
    """One row per compared quantity, as text: its max abs and max rel difference and the bound it was judged by,
    named ('max rel diff ≤ 1e-05'); the difference no bound applies to says so instead of a blank (the updated
    weights are judged by their absolute difference alone).

    Quantities the workload does not have (no gradients in forward, no weights outside train) are left out;
    a generate run adds whether the generated tokens are equal. Runs stored before verdicts recorded only
    absolute differences and no tolerances, so their table has only that column.
    """
    tolerances = verify.get("tolerances") or {}
    rows = []
    for label, abs_key, rel_key, tol_key in QUANTITIES:
        abs_diff, rel_diff = _diff(verify.get(abs_key)), _diff(verify.get(rel_key) if rel_key else None)
        if abs_diff is None and rel_diff is None:
            continue
        tol, kind = tolerances.get(tol_key), TOLERANCE_KIND[tol_key]
        missing = f"n/a: judged by max {kind} diff" if tol is not None else "—"  # (weights: no relative figure)
        rows.append({"quantity": label, "max abs diff": abs_diff or missing, "max rel diff": rel_diff or missing,
                     "bound": f"max {kind} diff ≤ {tol:.0e}" if tol is not None else "—"})  # fmt: skip
    if verify.get("tokens_equal") is not None:
        rows.append({"quantity": "generated tokens", "max abs diff": "n/a: tokens are compared", "max rel diff":
                     "n/a: tokens are compared", "bound": "must match: " + ("they match" if verify["tokens_equal"]
                     else "they DIFFER")})  # fmt: skip
    table = pd.DataFrame(rows, columns=["quantity", "max abs diff", "max rel diff", "bound"])
    # A run stored before verdicts has neither relative differences nor tolerances: no columns of blanks.
    if (table["max rel diff"] == "—").all():
        table = table.drop(columns="max rel diff")
    if (table["bound"] == "—").all():
        table = table.drop(columns="bound")
    return table
