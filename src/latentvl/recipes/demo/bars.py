"""The demo's bars: what each one measures in a report, which way is better, and the one rule that checks it.

A bar is a measured figure (:func:`bar_metrics`, from ``report.json``'s content) compared with its value under
``demo.bars`` in ``demo.yaml`` (:func:`check_bars`). The single-seed report and the seeds report both read
the figures and directions from :data:`BARS`; no other code compares a figure with a bar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BARS", "Bar", "bar_metrics", "check_bars", "meets"]


@dataclass(frozen=True)
class Bar:
    """One bar: ``check`` names it in ``checks``, ``metric`` names the figure in ``bar_metrics``, ``key`` its
    value in ``demo.bars``. ``higher_is_better``: met when figure >= bar (else figure <= bar); ``strict``: the
    comparison excludes equality. ``text``: its line in report.md (formatted with ``demo.bars``)."""

    check: str
    metric: str
    key: str
    higher_is_better: bool
    text: str
    strict: bool = False


_EPS = 1e-9

BARS: tuple[Bar, ...] = (
    Bar("stage_a_over_no_latents_at_hardest", "stage_a_minus_no_latents_at_hardest", "a_over_no_latents", True,
        "stage A >= no latents + {a_over_no_latents:.0%} at the hardest difficulty"),
    Bar("stage_a_over_pause_at_hardest", "stage_a_minus_pause_at_hardest", "a_over_pause", True,
        "stage A >= pause tokens + {a_over_pause:.0%} at the hardest difficulty"),
    Bar("masking_latents_costs_stage_a", "stage_a_mask_drop", "mask_drop", True,
        "masking every latent costs stage A >= {mask_drop:.0%}"),
    Bar("implant_followed", "stage_a_implant_follow_rate", "implant_follow", True,
        "implant: >= {implant_follow:.0%} of stage A's answers follow the implanted state"),
    Bar("stage_c_within_5_points_of_a", "stage_c_accuracy_drop", "max_c_accuracy_drop", False,
        "stage C no more than {max_c_accuracy_drop:.0%} below stage A"),
    Bar("stage_c_used_ratio_below_1", "stage_c_used_ratio", "max_c_used_ratio", False,
        "stage C used/budget (all latents) below {max_c_used_ratio:g}", strict=True),
    Bar("stage_c_halting_follows_difficulty", "stage_c_spearman_used_difficulty", "min_c_spearman", True,
        "stage C halting: Spearman(latents used, difficulty) >= {min_c_spearman:g} on the test split"),
    Bar("stage_c_halting_saves_latents", "stage_c_halting_used_ratio", "max_c_halting_used_ratio", False,
        "stage C halting: used/budget <= {max_c_halting_used_ratio:g} on the test split"),
)


def bar_metrics(report: Mapping[str, Any]) -> dict[str, float | None]:
    """Every bar's figure in ``report`` (``report.json``'s content), by ``Bar.metric``; None where the demo
    could not measure it (no causal check, no implied answer, no difficulty to halt against)."""
    r = report["results"]
    hard = report.get("hardest_difficulty")

    def at_hard(arm: str) -> float:
        by = r[arm]["accuracy_by_difficulty"]
        return by[hard]["accuracy"] if hard is not None and hard in by else r[arm]["accuracy"]

    mask = (r["stage_a"].get("causal") or {}).get("mask") or {}
    learned = (report.get("stage_c_halting") or {}).get("learned") or {}
    return {
        "stage_a_minus_no_latents_at_hardest": at_hard("stage_a") - at_hard("baseline_no_latents"),
        "stage_a_minus_pause_at_hardest": at_hard("stage_a") - at_hard("pause"),
        "stage_a_mask_drop": None if mask.get("accuracy") is None else r["stage_a"]["accuracy"] - mask["accuracy"],
        "stage_a_implant_follow_rate": (r["stage_a"].get("implant") or {}).get("follow_rate"),
        "stage_c_accuracy_drop": r["stage_a"]["accuracy"] - r["stage_c"]["accuracy"],
        "stage_c_used_ratio": r["stage_c"].get("used_ratio"),
        "stage_c_spearman_used_difficulty": learned.get("spearman_used_difficulty"),
        "stage_c_halting_used_ratio": learned.get("used_ratio"),
    }


def meets(bar: Bar, value: float | None, bars: Mapping[str, float]) -> bool:
    """Whether ``value`` meets ``bar`` at ``bars[bar.key]``; a figure that was not measured (None) does not.
    Equality is judged to within ``1e-9`` (a difference of accuracies is not exact in floating point)."""
    if value is None:
        return False
    limit = float(bars[bar.key])
    margin = value - limit if bar.higher_is_better else limit - value
    return margin > _EPS if bar.strict else margin >= -_EPS


def check_bars(metrics: Mapping[str, float | None], bars: Mapping[str, float]) -> dict[str, bool]:
    """``checks``: every bar of :data:`BARS`, by ``Bar.check``, met or not by ``metrics``."""
    return {bar.check: meets(bar, metrics.get(bar.metric), bars) for bar in BARS}
