"""The leave-one-family-out protocol (eval/lofo.py) on z-scores whose answer is known: each attack family moves
its own components, so a formulation that reads only one family's component must fail on the other, the held-out
family must never reach a fit, and the pick rule must refuse a method that raises false alarms on a shift."""

from __future__ import annotations

import numpy as np

from nccr_guard.eval import lofo

N_CLEAN = 400


def data(seed: int = 0) -> lofo.Data:
    """Six components; family `f1` (attack a1) raises components 0 and 1, family `f2` raises component 1 (a2)
    or component 0 (a3). Shift `s1` (calibration) is clean-like; `s2` (held out) raises component 2 only."""
    rng = np.random.default_rng(seed)

    def normal(n: int) -> np.ndarray:
        return rng.normal(size=(n, 6))

    def raised(n: int, cols: list[int], by: float) -> np.ndarray:
        z = normal(n)
        z[:, cols] += by
        return z

    attack = {"a1": raised(40, [0, 1], 3.0), "a2": raised(40, [1], 4.0), "a3": raised(40, [0], 4.0)}
    shift = {"s1": normal(N_CLEAN), "s2": raised(N_CLEAN, [2], 3.0)}
    return lofo.Data(
        names=[f"c{i}" for i in range(6)],
        modality="image",
        calib_b=normal(400),
        clean=normal(N_CLEAN),
        shift=shift,
        attack=attack,
        attack_src={a: rng.integers(0, N_CLEAN, len(v)) for a, v in attack.items()},
        ood={"blank": normal(20)},
        families={"f1": ["a1"], "f2": ["a2", "a3"]},
        calibration_shifts=("s1",),
        held_out_shifts=("s2",),
        baseline="test baseline",
        base={
            "calib_b": rng.random(400),
            "clean": rng.random(N_CLEAN),
            **{f"shift:{s}": rng.random(N_CLEAN) for s in shift},
            **{f"attack:{a}": rng.random(len(v)) + 0.5 for a, v in attack.items()},
        },
    )


class Recording(lofo.GreedyMax):
    """The served max-combiner over component 0 that remembers which attacks every fit was shown."""

    def __init__(self) -> None:
        super().__init__(1, [0], fixed=True, label="c0 (recording)")
        self.shown: list[set[str]] = []

    def fit(self, neg: np.ndarray, pos: dict[str, np.ndarray]) -> Recording:
        self.shown.append(set(pos))
        return self


def test_a_formulation_is_judged_by_the_family_it_never_saw():
    d = data()
    rec = Recording()
    [row] = lofo.lofo(d, [rec])
    # Component 0 catches a1 and a3; a2 moves only component 1: f2 is its worst held-out family, at chance.
    assert row["worst_family"] == "f2" and row["folds"]["f2"]["attack"] == "a2"
    assert row["folds"]["f2"]["auroc"] < 0.7 < 0.95 < row["folds"]["f1"]["auroc"]
    assert row["worst_auroc"] == row["folds"]["f2"]["auroc"]
    # Each fold's fit saw every family but the held-out one.
    assert rec.shown == [{"a2", "a3"}, {"a1"}]


def test_a_regression_fitted_on_both_components_holds_where_one_component_fails():
    d = data()
    fixed, fitted = lofo.lofo(d, [lofo.fixed(d, ["c0"], "c0"), lofo.Logistic(1000, 10.0)])
    # Whichever family is held out, the other one raises both components, so the regression weighs both and
    # catches the held-out attacks; component 0 alone misses a2.
    assert fitted["worst_auroc"] > fixed["worst_auroc"] + 0.2


def test_the_pick_refuses_a_method_whose_false_alarms_break_a_goal():
    d = data()
    methods = [lofo.fixed(d, ["c0", "c1"], "c0+c1"), lofo.fixed(d, ["c0", "c1", "c2"], "c0+c1+c2")]
    rows = lofo.lofo(d, methods)
    neg = lofo.negatives(d)
    for m, r in zip(methods, rows, strict=True):
        r["all_families"] = lofo.scored(m.fit(neg, {}), d, list(d.attack))
    by = {r["method"]: r for r in rows}
    # Reading component 2 flags the held-out shift s2 (component 2 raised by 3 sigma) far past 10 %.
    assert by["c0+c1+c2"]["all_families"]["fpr_shift"]["s2"] > 0.3
    assert by["c0+c1"]["all_families"]["fpr_shift"]["s2"] <= 0.15
    rows.append(lofo.fs_row(d))
    assert rows[-1]["method"] == "test baseline (baseline)" and set(rows[-1]["folds"]) == {"f1", "f2"}
    picked = lofo.pick(rows, N_CLEAN // 2)
    assert picked == "c0+c1"  # never the baseline, never the one over the shift goal


def test_the_report_has_a_row_per_method_and_the_pick():
    d = data()
    rows = lofo.lofo(d, [lofo.fixed(d, ["c0", "c1"], "c0+c1")])
    rows[0]["all_families"] = lofo.scored(lofo.fixed(d, ["c0", "c1"], "c0+c1"), d, list(d.attack))
    result = {
        "model": "m",
        "command": "nccr-guard lofo --model m",
        "machine": "test",
        "seconds": 1.0,
        "n_dev_clean": N_CLEAN,
        "families": d.families,
        "calibration_shifts": list(d.calibration_shifts),
        "held_out_shifts": list(d.held_out_shifts),
        "methods": rows,
        "n_held_out_clean": N_CLEAN // 2,
        "picked": "c0+c1",
    }
    md = lofo.markdown(result)
    assert "| c0+c1 | **" in md and "**c0+c1**" in md and "| method | clean | s1 | s2 |" in md
