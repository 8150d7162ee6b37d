"""Sequential testing in the engine (pure): the round plan, the bounds, and the replay over real activations."""

from __future__ import annotations

import numpy as np
import pytest

from nccr_guard.calibrate import activations
from nccr_guard.engine import get_variant, score_rows
from nccr_guard.engine.sequential import Schedule, bounded_scores, layout, max_copies, replay, rounds


def test_round_plan_and_row_layout():
    v = get_variant("nccr-audio-v1")
    assert max_copies(v) == 8 and max_copies(get_variant("nccr-v3")) == 0
    assert rounds(v, Schedule(2, 2)) == [2, 4, 6, 8]
    assert rounds(v, Schedule(3, 4)) == [3, 7, 8]
    assert rounds(get_variant("nccr-v3"), Schedule()) == [0]
    for n in (1, 2, 5, 8):
        idx = layout(v, n)
        assert len(idx) == v.with_k(n).rows and len(set(idx)) == len(idx) and idx[0] == 0
    assert (layout(v, 8) == np.arange(v.rows)).all()
    # the fixed-K rows: original, 8 shifts (1-8), one 12-bit row (9), 8 noisy (10-17); two copies per family
    assert layout(v, 2).tolist() == [0, 1, 2, 9, 10, 11]
    with pytest.raises(ValueError):
        Schedule(0, 1)


def test_per_family_first_rounds():
    """`first_by`: two spread shifts but one noisy copy in the first round, then `step` more of each, up to K."""
    v = get_variant("nccr-audio-v2")
    plan = rounds(v, Schedule(1, 2, 2.0, (("sweep", 2),)))
    assert [(n["sweep:400"], n["snr:20"]) for n in plan] == [(2, 1), (4, 3), (6, 5), (8, 7), (8, 8)]
    # original, the first two shifts (1-2), the 12-bit row (9), the first noisy copy (10)
    assert layout(v, plan[0]).tolist() == [0, 1, 2, 9, 10]
    assert (layout(v, plan[-1]) == np.arange(v.rows)).all()
    assert Schedule(1, 2, 2.0, (("sweep", 2),)).label == "1 (sweep 2)/2/2"
    with pytest.raises(ValueError):
        Schedule(1, 1, 2.0, (("sweep", 0),))


def test_schedule_labels_parse_back_and_bad_ones_are_refused():
    """`--sequential-schedule` takes the labels the reports print: every schedule of the grid reads back as itself,
    and a malformed label, a zero, or a family the variant does not draw is an error, not a silent default."""
    from nccr_guard.eval.sequential import GRID

    assert all(Schedule.parse(s.label) == s for s in GRID)
    assert Schedule.parse(" 1(sweep 3) (snr 2) / 2 / .5 ") == Schedule(1, 2, 0.5, (("sweep", 3), ("snr", 2)))
    for bad in ("1/1", "1/1/1/1", "a/1/1", "1 (sweep)/1/1", "1/1/-1", "0/1/1", "1 (sweep 0)/1/1"):
        with pytest.raises(ValueError):
            Schedule.parse(bad)
    v = get_variant("nccr-audio-v2")
    assert v.with_schedule(Schedule.parse("1 (sweep 3)/1/1.5")).sequential == Schedule(1, 1, 1.5, (("sweep", 3),))
    with pytest.raises(ValueError, match="swep"):
        v.with_schedule(Schedule.parse("1 (swep 3)/1/1.5"))
    with pytest.raises(ValueError, match="no noise copies"):
        get_variant("nccr-v3").with_schedule(Schedule())
    from nccr_guard.eval.sequential import main
    from tests.conftest import MNIST

    with pytest.raises(SystemExit) as e:  # the replay harness refuses before it attacks anything
        main(["--model", str(MNIST), "--schedule", "2/2/2", "--out", "/nonexistent"])
    assert e.value.code == 2


def test_schedules_per_model_parse_and_load(mnist_v3):
    """`--sequential-schedule` also takes `NAME=LABEL` entries: each model gets its own, a bare label covers the
    rest, and a name given twice, an empty name, or a model without noise copies named is an error."""
    from nccr_guard.detector import Detector
    from nccr_guard.engine.variants import parse_schedules
    from nccr_guard.manifest import ManifestError
    from tests.conftest import MNIST

    assert parse_schedules("4/4/2") == {None: Schedule(4, 4, 2.0)}
    assert parse_schedules(" speaker = 1 (sweep 3)/1/1.5 ; 4/4/2 ;") == {
        "speaker": Schedule(1, 1, 1.5, (("sweep", 3),)),
        None: Schedule(4, 4, 2.0),
    }
    for bad, why in (
        ("a=1/1/1; a=2/2/2", "twice"),
        ("1/1/1; 2/2/2", "twice"),
        ("=1/1/1", "no model name"),
        (";", "empty"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_schedules(bad)
    assert Detector.load(mnist_v3, schedule="speaker=4/4/2; 3/3/2").schedule is None  # no noise copies: ignored
    with pytest.raises(ManifestError, match="mnist.*no noise copies"):
        Detector.load(mnist_v3, schedule="mnist=4/4/2")
    assert Detector.load(MNIST, schedule="3/3/2").schedule is None  # the served nccr-v4: a weighted sum, ignored
    with pytest.raises(ManifestError, match="mnist.*weighted sum"):
        Detector.load(MNIST, schedule="mnist=4/4/2")


def test_per_family_counts_decide_as_one_count_does(mnist_v2):
    """A plan of per-family counts that are all equal replays exactly as the plain count: the two code paths of
    `layout` and `bounded_scores` agree."""
    det, clean, noisy = mnist_v2
    for acts in (clean, noisy):
        a, pa = replay(det.variant, det.calib, acts, Schedule(2, 2, 2.0))
        b, pb = replay(det.variant, det.calib, acts, Schedule(1, 2, 2.0, (("gaussian", 2),)))
        assert (pa == pb).all() and np.array_equal(a.score, b.score)  # same numpy steps, same order: exact


@pytest.fixture(scope="module")
def mnist_v2(mnist_test):
    """The MNIST model under nccr-v2 (12 Gaussian copies), calibrated in memory, and activations of held-out
    digits and of ART FGSM adversarial examples of them."""
    from nccr_guard.backends.torch_backend import load_module
    from nccr_guard.calibrate import calibrate
    from nccr_guard.detector import Detector
    from nccr_guard.eval.attacks import ATTACKS, art_classifier, run_attack
    from tests.conftest import MNIST

    det = Detector.load(MNIST, backend="onnx", device="cpu", sequential=False)
    det.variant = get_variant("nccr-v2")
    det.calib = calibrate(MNIST, variant="nccr-v2", write=False, backend="onnx")
    xs = mnist_test[0][:120]
    clf = art_classifier(load_module(det.manifest), (1, 28, 28), 10, (0.0, 1.0))
    adv = run_attack("fgsm", clf, xs[:60], 0, ATTACKS)
    return det, activations(det, xs), activations(det, adv)


def test_bounds_close_at_k_and_contain_the_fixed_k_score(mnist_v2):
    det, clean, _ = mnist_v2
    v, k = det.variant, max_copies(det.variant)
    fixed = score_rows(v, det.calib, clean).score
    s, lo, hi = bounded_scores(v, det.calib, clean, k, 2.0)
    # numpy against numpy, the copies' mean summed by another code path: within rtol 1e-5 (float32: ~K u)
    assert np.allclose(s.score, fixed) and np.allclose(lo, fixed) and np.allclose(hi, fixed)
    for n in (2, 4, 8):
        s, lo, hi = bounded_scores(v, det.calib, {key: a[:, layout(v, n)] for key, a in clean.items()}, n, 3.0)
        assert (lo <= s.score + 1e-9).all() and (s.score <= hi + 1e-9).all()
        assert np.mean((lo <= fixed + 1e-9) & (fixed <= hi + 1e-9)) > 0.9  # a z=3 bound rarely misses


def test_replay_never_exceeds_k_and_agrees_on_clear_cut_inputs(mnist_v2):
    det, clean, noisy = mnist_v2
    v, thr = det.variant, det.calib.threshold
    schedule = Schedule(2, 2, 2.0)
    sizes = {len(layout(v, n)) for n in rounds(v, schedule)}
    for acts in (clean, noisy):
        fixed = score_rows(v, det.calib, acts).score
        seq, passes = replay(v, det.calib, acts, schedule)
        assert (passes <= v.rows).all() and set(passes) <= sizes
        clear = np.abs(fixed - thr) > 0.5  # clear-cut: half a clean standard deviation from the threshold
        assert clear.sum() >= 10
        assert ((seq.score > thr) == (fixed > thr))[clear].all()
    _, p_clean = replay(v, det.calib, clean, schedule)
    assert p_clean.mean() < v.rows  # it does stop early


def test_detector_online_rounds_match_the_replay(mnist_v2, mnist_test):
    """Detector.detect (jobs forwarded round by round) decides as replay does over the same fixed-K rows."""
    det, _, _ = mnist_v2
    xs = list(mnist_test[0][200:230])
    acts = det.activations(xs)
    import dataclasses

    det.variant = dataclasses.replace(det.variant, sequential=Schedule(2, 2, 2.0))
    det.use_sequential = True
    try:
        got = det.detect(xs)
        want, passes = replay(det.variant, det.calib, acts, det.variant.sequential)
    finally:
        det.use_sequential = False
    # Across batches (tests/tolerance.py): the rounds forward other row counts than the replay's one forward;
    # ONNX Runtime gives each row the same logits whatever its batch (so the stopping rounds are equal), and the
    # copies' means are summed in another order, within 1e-4 on the O(1) z-scores.
    assert [g.passes for g in got] == passes.tolist()
    assert np.allclose([g.score for g in got], want.score, atol=1e-4)


def test_flip_bound_uses_the_clean_prior():
    """Prediction flips: with clean clips' low flip rate as prior, no flip in the first copies predicts none to
    come (the clip can settle clean); a higher prior rate or an observed flip predicts more."""
    from nccr_guard.engine.sequential import _bounds, _flips_to_come

    none_yet = np.zeros(3)
    assert (_flips_to_come(none_yet, 2, 8, 1.0, 0.005) == 0).all()
    assert (_flips_to_come(none_yet, 2, 8, 1.0, 0.2) >= 1).all()
    per = np.array([[0.0, 0.0], [1.0, 0.0]])
    lo, hi = _bounds(per, per.mean(1), True, 0.005, 2, 8, 1.0)
    assert lo.tolist() == [0.0, 1 / 8] and hi[0] == 0.0 and hi[1] >= 1 / 8  # one flip: adversarial already
    lo, hi = _bounds(per, per.mean(1), True, None, 2, 8, 1.0)  # no prior recorded: Agresti-Coull, never certain
    assert hi[0] > 0


def test_jobs_at_different_rounds_share_a_forward(mnist_v2, mnist_test):
    """What the server's batcher does: one `advance` call carries jobs at different rounds. Each must be scored
    once, at its own round, and end exactly as the replay of its fixed-K rows does."""
    import dataclasses

    det, _, _ = mnist_v2
    xs = list(mnist_test[0][300:330])
    want, passes = replay(det.variant, det.calib, det.activations(xs), Schedule(1, 1, 0.5))
    det.variant = dataclasses.replace(det.variant, sequential=Schedule(1, 1, 0.5))
    det.use_sequential = True
    try:
        jobs = [det.start(x) for x in xs]
        det.advance(jobs[:10])  # the first ten are a round ahead
        det.advance(jobs[:5])  # and the first five two rounds
        while live := [j for j in jobs if not j.done]:
            assert len({j.round for j in live}) >= 1
            det.advance(live)
    finally:
        det.use_sequential = False
        det.variant = dataclasses.replace(det.variant, sequential=None)
    assert [j.verdict.passes for j in jobs] == passes.tolist()  # as in the test above: across batches
    assert np.allclose([j.verdict.score for j in jobs], want.score, atol=1e-4)


def test_a_near_flip_keeps_a_clip_from_settling_clean():
    """A copy whose margin fell below what clean copies reach (a near flip) counts when predicting the flips to
    come: the clip cannot settle on the luck of its first copies; without one it settles as before."""
    from nccr_guard.engine.sequential import _bounds

    per = np.zeros((2, 2))  # no flip in either clip's two copies
    _, hi = _bounds(per, per.mean(1), True, 0.003, 2, 8, 2.0, near=np.array([0, 1]))  # ~ the speaker's rate
    assert hi[0] == 0.0 and hi[1] >= 1 / 8


def test_calibration_records_the_near_flip_margin_of_clean_copies():
    """near_flips: per prediction-flip component, the 1 % quantile of clean copies' relative margins."""
    from nccr_guard.engine.calibration import NEAR_FLIP_QUANTILE, near_flips

    v = get_variant("nccr-audio-v2")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, v.rows, 10)).astype(np.float32)
    logits[:, :, 3] += 6.0  # class 3 wins every row by a margin of about 6
    got = near_flips(v, {"logits": logits})
    assert got[:2] == [None, None] and 0.0 < got[2] < 1.0
    rows = slice(10, 18)  # snr:20's copies (after the original, 8 sweeps and one 12-bit row)
    m = logits[:, :, 3] - np.delete(logits, 3, axis=2).max(-1)
    assert np.isclose(got[2], np.quantile(m[:, rows] / np.abs(m[:, :1]), NEAR_FLIP_QUANTILE))


def test_replay_report_keeps_the_schedule_it_ran():
    """The replay harness's JSON keeps each schedule's fields and label, and its markdown table is rebuilt from
    the label, so a per-family first round ('1 (sweep 3)') shows in the table as `--sequential-schedule` takes it."""
    import json

    from nccr_guard.eval.sequential import markdown, schedule_record

    for label in ("1 (sweep 3)/1/1.5", "2/2/2", "1 (shift 2) (snr 1)/3/0.5"):
        rec = json.loads(json.dumps(schedule_record(Schedule.parse(label))))
        assert Schedule.parse(rec["label"]) == Schedule.parse(label) and rec["step"] == Schedule.parse(label).step
    run = {
        "schedule": json.loads(json.dumps(schedule_record(Schedule(1, 1, 1.5, (("sweep", 3),))))),
        "fixed_rows": 18,
        "clean": {"mean_rows": 5.2, "fpr_fixed": 0.05, "fpr_sequential": 0.05},
        "attacks": {
            "pgd": {
                "mean_rows": 6.0,
                "auroc_fixed": 0.9,
                "auroc_sequential": 0.89,
                "tpr_fixed": 0.8,
                "tpr_sequential": 0.8,
            }
        },
    }
    table = markdown(
        {
            "model": "speaker",
            "variant": "v",
            "split": "dev",
            "command": "c",
            "seed": 0,
            "machine": "m",
            "seconds": 1,
            "n_clean": 9,
            "runs": [run],
        }
    )
    assert "| 1 (sweep 3) | 1 | 1.5 | 5.2 of 18 | 6.0, 0.900→0.890, 0.800→0.800 | 0.050→0.050 |" in table
