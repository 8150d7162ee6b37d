"""The NCCR engine on its own: pure arrays in, scores out.

Its comparisons are all within numpy, one code path against another doing the same float operations in the same
order (a batch against its inputs one by one, lazy rows against fixed-K rows, a gather against per-component
margins, a calibration against its saved copy): exact by construction on any processor (tests/tolerance.py), so
they are bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from nccr_guard.engine import (
    Component,
    Perturbation,
    Variant,
    build_batch,
    build_rows,
    fit_calibration,
    get_variant,
    score_rows,
)
from nccr_guard.engine.perturb import perturb, row_groups


def fake_acts(n: int, r: int, rng: np.random.Generator, spread: float) -> dict[str, np.ndarray]:
    base = rng.normal(size=(n, 1, 32))
    hidden = np.maximum(base + spread * rng.normal(size=(n, r, 32)), 0)
    hidden[:, 0] = np.maximum(base[:, 0], 0)
    logits = hidden[..., :10] * 3
    return {"fc": hidden.astype(np.float32), "logits": logits.astype(np.float32)}


def test_rows_original_first_and_counts():
    x = np.full((1, 4, 4), 0.5, np.float32)
    ps = (Perturbation("bitdepth", 1), Perturbation("gaussian", 0.1, 5))
    rows = build_rows(x, ps, np.random.default_rng(0), (0.0, 1.0))
    assert rows.shape == (7, 1, 4, 4)
    np.testing.assert_array_equal(rows[0], x)
    assert row_groups(ps) == {"bitdepth:1": slice(1, 2), "gaussian:0.1": slice(2, 7)}
    assert rows.min() >= 0 and rows.max() <= 1


@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 5, 7), (40,)])
def test_batch_rows_equal_each_input_built_alone(shape):
    """The serving path builds a batch's rows at once (one call per squeezer); each input's rows, random copies
    included, must be exactly those it gets alone, whatever its batch-mates."""
    ps = (Perturbation("median", 3), Perturbation("gaussian", 0.1, 3), Perturbation("bitdepth", 2))
    ps += (Perturbation("shift", 4, 2),) if len(shape) == 1 else ()
    xs = np.random.default_rng(2).random((5, *shape)).astype(np.float32)
    together = build_batch(xs, ps, [np.random.default_rng(i) for i in range(5)], (0.0, 1.0))
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(together[i], build_rows(x, ps, np.random.default_rng(i), (0.0, 1.0)))
    assert not np.array_equal(together[0, 1:], together[1, 1:])


FAMILIES = (
    Perturbation("gaussian", 0.1, 5),
    Perturbation("uniform", 0.2, 3),
    Perturbation("snr", 20, 4),
    Perturbation("gain", 3, 4),
    Perturbation("sweep", 40, 5),
    Perturbation("shift", 30, 3),
    Perturbation("bitdepth", 4),
    Perturbation("median", 3),
)


@pytest.mark.parametrize("seed", range(12))
def test_lazy_rows_are_the_fixed_k_rows_bit_for_bit(seed):
    """Sequential jobs build their rows as rounds ask for them (LazyRows): whatever rows are asked for in
    whatever order, each must be exactly the row `build_rows` draws, or the verdicts and the calibration would
    part ways. Every family, in random orders and subsets, on an image and on a clip."""
    from nccr_guard.engine.perturb import LazyRows

    pick = np.random.default_rng(seed)
    ps = tuple(pick.permutation(np.array(FAMILIES, dtype=object))[: pick.integers(1, len(FAMILIES) + 1)])
    for shape, lo, hi in (((1, 12, 12), 0.0, 1.0), ((3000,), -1.0, 1.0)):
        x = (lo + (hi - lo) * pick.random(shape)).astype(np.float32)
        want = build_rows(x, ps, np.random.default_rng([7, seed]), (lo, hi))
        lazy = LazyRows(x, ps, lambda: np.random.default_rng([7, seed]), (lo, hi))  # noqa: B023 - used at once
        assert len(lazy) == len(want)
        order = pick.permutation(len(want))
        for part in np.array_split(order, pick.integers(1, 5)):
            part = np.sort(part)
            np.testing.assert_array_equal(lazy.take(part), want[part])
        np.testing.assert_array_equal(lazy.take(np.arange(len(want))), want)


def test_lazy_rows_draw_only_what_a_round_asks_for():
    """The point of it: a first round of one noisy copy draws one copy's noise, not K's."""
    from nccr_guard.engine.perturb import LazyRows

    x = np.zeros(1000, np.float32)
    made = []
    lazy = LazyRows(x, (Perturbation("snr", 20, 8),), lambda: made.append(1) or np.random.default_rng(0), (-1, 1))
    assert not made  # no generator until a noisy row is asked for
    lazy.take(np.array([0]))
    assert not made and lazy._made.sum() == 1
    lazy.take(np.array([0, 1]))
    assert made == [1] and lazy._made.sum() == 2


def test_squeezers_are_what_they_say():
    x = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    one_bit = perturb(x, Perturbation("bitdepth", 1), np.random.default_rng(0), (0, 1))[0]
    assert set(np.unique(one_bit)) <= {0.0, 1.0}
    med = perturb(np.eye(5, dtype=np.float32)[None], Perturbation("median", 3), np.random.default_rng(0), (0, 1))[0]
    assert med.sum() < np.eye(5).sum()  # a thin diagonal line is (mostly) filtered away


def test_zero_scale_gives_zero_score():
    v = Variant(
        "zero",
        (Perturbation("gaussian", 0.0, 8),),
        (Component("gaussian:0", "fc", "flip"), Component("gaussian:0", "fc", "change", "class")),
        robustness=Component("gaussian:0", "*", "flip", "class"),
    )
    rng = np.random.default_rng(1)
    x = rng.random((1, 6, 6)).astype(np.float32)
    rows = build_rows(x, v.perturbations, rng, (0, 1))
    assert np.all(rows == x)
    clean = fake_acts(60, v.rows, rng, 0.0)
    calib = fit_calibration(v, {k: a[::2] for k, a in clean.items()}, {k: a[1::2] for k, a in clean.items()}, 10)
    s = score_rows(v, calib, clean)
    assert np.all(s.raw == 0)


def test_unstable_inputs_score_higher():
    v = Variant(
        "t",
        (Perturbation("gaussian", 0.1, 8),),
        (Component("gaussian:0.1", "fc", "change"), Component("gaussian:0.1", "fc", "flip", "class", "max")),
        robustness=Component("gaussian:0.1", "*", "flip", "class"),
    )
    rng = np.random.default_rng(2)
    a, b = fake_acts(200, v.rows, rng, 0.1), fake_acts(200, v.rows, rng, 0.1)
    calib = fit_calibration(v, a, b, 10, target_fpr=0.1)
    clean = score_rows(v, calib, fake_acts(100, v.rows, rng, 0.1)).score
    unstable = score_rows(v, calib, fake_acts(100, v.rows, rng, 0.6)).score
    assert np.median(unstable) > np.quantile(clean, 0.95)
    assert calib.selection["fc"].shape == (10, 20)
    assert calib.thresholds["fc"].shape == (32,)


def test_calibration_roundtrip(tmp_path):
    v = get_variant("nccr-v3")
    rng = np.random.default_rng(3)
    a, b = fake_acts(80, v.rows, rng, 0.1), fake_acts(80, v.rows, rng, 0.1)
    calib = fit_calibration(v, a, b, 10, meta={"weights_sha256": {"w": "x"}})
    calib.save(tmp_path / "c.npz")
    from nccr_guard.engine import Calibration

    back = Calibration.load(tmp_path / "c.npz")
    acts = fake_acts(5, v.rows, rng, 0.3)
    np.testing.assert_array_equal(score_rows(v, calib, acts).score, score_rows(v, back, acts).score)
    assert back.meta["weights_sha256"] == {"w": "x"} and back.threshold == calib.threshold


def test_p_value_is_monotone():
    v = get_variant("nccr-v3")
    rng = np.random.default_rng(4)
    calib = fit_calibration(v, fake_acts(80, v.rows, rng, 0.1), fake_acts(80, v.rows, rng, 0.1), 10)
    p = calib.p_value(np.array([-10.0, 0.0, 10.0, 1e9]))
    assert np.all(np.diff(p) <= 0) and p[0] == 1.0 and p[-1] == pytest.approx(1 / (len(calib.clean_scores) + 1))
    # the verdicts' plain-Python twin: the same values, at the clean scores themselves (ties), between, outside, NaN
    clean = calib.clean_scores
    scores = np.concatenate([clean, (clean[1:] + clean[:-1]) / 2, [-np.inf, -10.0, 10.0, np.inf, np.nan]])
    assert calib.p_values(scores.tolist()) == calib.p_value(scores).tolist()


def test_unknown_variant_and_family_fail_clearly():
    with pytest.raises(ValueError, match="unknown NCCR variant"):
        get_variant("nope")
    with pytest.raises(ValueError, match="unknown perturbation family"):
        Perturbation("blur", 1)


@pytest.mark.parametrize("copies", [2, 4, 8])
def test_sweep_spreads_every_prefix_of_its_shifts_over_the_range(copies):
    """`sweep` copies are circular shifts whose first 2^m fall one in each 2^m-th of [-scale, scale] (so a mean
    over the first copies of a round already sees the whole range), from a start that differs per generator."""
    x = np.zeros(4000, np.float32)
    x[0] = 1.0  # an impulse: each copy's shift is where the impulse went
    p = Perturbation("sweep", 400, copies)

    def shifts(seed: int) -> np.ndarray:
        rows = perturb(x, p, np.random.default_rng(seed), (-1.0, 1.0))
        pos = rows.argmax(-1)
        return np.where(pos > 2000, pos - 4000, pos)

    for seed in range(20):
        s = shifts(seed)
        assert np.abs(s).max() <= 400 and len(set(s.tolist())) == copies
        for m in (1, 2, 4):
            if m <= copies:
                cells = np.floor((s[:m] + 400) / 800 * m).clip(0, m - 1)
                assert len(set(cells.tolist())) == m, (seed, s)
    assert not np.array_equal(shifts(0), shifts(1))


def test_robustness_rows_are_never_verdict_rows():
    """A model-level measure with rows of its own: the verdict's rows stay as they were, and the robustness
    variant makes only those rows and measures only that component."""
    v = get_variant("nccr-v3")
    assert v.robustness_rows is not None and v.rows == 4
    assert all(p.family == "bitdepth" for p in v.perturbations)
    r = v.robustness_variant()
    assert r.perturbations == (v.robustness_rows,) and r.components == (v.robustness,) and r.rows == 17
    assert r.robustness_variant() is r and get_variant("nccr-audio-v2").robustness_variant().rows == 18
    assert v.with_k(5).robustness_rows == v.robustness_rows  # K is the verdict's, not the model-level measure's
    with pytest.raises(ValueError, match="unknown perturbation"):
        Variant("x", v.perturbations, v.components, robustness=Component("gaussian:0.2", "logits", "margin"))
    with pytest.raises(ValueError, match="own rows"):
        Variant(
            "x",
            v.perturbations,
            v.components,
            robustness=Component("gaussian:0.1", "logits", "change"),
            robustness_rows=Perturbation("gaussian", 0.1, 4),
        )


@pytest.mark.parametrize("measure", ["margin_change", "margin"])
def test_one_row_margin_gather_equals_component_by_component(measure):
    """nccr-v3's scoring reads its three squeezed rows' margins in one gather (Variant.one_row_margins); every
    raw value must be bit for bit what the per-component path gives, and variants outside that shape keep it."""
    from nccr_guard.engine.score import component_raw, raw_components

    ps = (Perturbation("bitdepth", 3), Perturbation("bitdepth", 1), Perturbation("median", 2))
    v = Variant(
        "t",
        ps,
        tuple(Component(p.key, "logits", measure) for p in ps),
        robustness=Component("bitdepth:1", "logits", "margin"),
    )
    assert v.one_row_margins == (measure, [1, 2, 3])
    acts = fake_acts(64, v.rows, np.random.default_rng(5), 0.5)
    calib = fit_calibration(v, acts, acts, 10)
    raw, pred = raw_components(v, calib, acts)
    one_by_one = np.stack([component_raw(c, acts, calib, v.groups[c.perturbation], pred) for c in v.components], -1)
    assert raw.dtype == np.float64 and raw.flags.c_contiguous
    np.testing.assert_array_equal(raw, one_by_one.astype(np.float64))
    assert (raw > 0).any()
    mixed = Variant("m", ps, (*v.components[:2], Component("median:2", "logits", "pred_flip")), robustness=v.robustness)
    noisy = get_variant("nccr-v2")
    assert mixed.one_row_margins is None and noisy.one_row_margins is None and get_variant("nccr-v3").one_row_margins


def test_search_greedy_can_start_from_a_variant():
    """`nccr-guard search --start-from VARIANT`: the greedy max-combination starts with the variant's components
    (its own row first), then adds the candidate that best lifts the worst attack; a variant with a component
    that is no candidate is refused."""
    from nccr_guard.eval.search import _start_components, candidate_variant, greedy

    cands = candidate_variant(["fc1"])
    idx = _start_components(cands, "nccr-v3")
    assert [cands.components[i].name for i in idx] == [c.name for c in get_variant("nccr-v3").components]
    assert _start_components(cands, None) == []
    with pytest.raises(ValueError, match="not among"):
        _start_components(candidate_variant(["fc1"], "audio"), "nccr-v3")
    rng = np.random.default_rng(0)
    clean, calib_b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    adv = {"a": rng.normal(size=(100, 4)), "b": rng.normal(size=(100, 4))}
    adv["a"][:, 0] += 3  # component 0 catches attack a, component 3 attack b, 1 and 2 nothing
    adv["b"][:, 3] += 3
    rows = [{"index": i, "component": f"c{i}"} for i in range(4)]
    out = greedy(rows, clean, adv, calib_b, size=1, start=[0])
    assert [o["components"] for o in out] == [["c0"], ["c0", "c3"]]
    assert out[0]["per_attack"]["b"]["auroc"] < 0.65 < 0.9 < out[1]["per_attack"]["b"]["auroc"]
    assert len(greedy(rows, clean, adv, calib_b, size=1)) == 1  # without a start: one row per added component
