"""Each attack family of the harness runs through ART on the shipped model: a smoke run of every new attack on
a few held-out digits at a small budget (the table's budgets run in `make eval`), checking the threat model
each one stands for: its norm, its sparsity, its confidence. square_conf10 is square with a stricter success
criterion (the same code path): at a smoke budget it has not yet gone past the boundary, so it runs in
`make eval` only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from nccr_guard.eval.attacks import ATTACKS, FAMILIES, attack_succeeded, attacks_of, correctly_classified, run_attack

SMALL = {
    "apgd_ce": {"max_iter": 10},
    "apgd_dlr": {"max_iter": 10},
    "pgd_l2": {"max_iter": 20},
    "ead": {"max_iter": 10, "binary_search_steps": 1},
    "ead_conf10": {"max_iter": 10, "binary_search_steps": 1},
    "jsma": {},
    "jsma_highconf": {},
    "square": {"max_iter": 200},
    "hopskipjump": {"max_iter": 2, "max_eval": 100, "init_eval": 20},
    "hopskipjump_short": {"max_iter": 1, "max_eval": 100, "init_eval": 20},
}


@pytest.fixture(scope="module")
def digits(detector):
    clf, x, y, _ = correctly_classified(detector, "test", 6)
    return clf, x, y


def test_every_family_has_a_minimal_and_a_high_confidence_attack():
    for fam in FAMILIES:
        strengths = {ATTACKS[a].strength for a in attacks_of([fam])}
        assert strengths == {"minimal", "high"}, fam
    with pytest.raises(ValueError, match="unknown attack families"):
        attacks_of(["l3"])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_attack_smoke(name, digits):
    clf, x, y = digits
    table = {name: replace(ATTACKS[name], params={**ATTACKS[name].params, **SMALL[name]})}
    adv = run_attack(name, clf, x, seed=0, table=table)
    assert adv.shape == x.shape and adv.dtype == np.float32
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    hit = attack_succeeded(name, clf.predict(adv).argmax(1), y, 10)
    assert hit.any(), f"{name} fooled none of {len(x)} digits"
    delta = (adv - x).reshape(len(x), -1)[hit]
    p = table[name].params
    if name.startswith(("apgd", "square")):
        assert np.abs(delta).max() <= p["eps"] + 1e-5  # an L-inf ball
    if name == "pgd_l2":
        assert np.linalg.norm(delta, axis=1).max() <= p["eps"] + 1e-4  # an L2 ball
    if name == "jsma":
        assert (np.abs(delta) > 1e-6).sum(1).max() <= 0.1 * delta.shape[1] + 2  # sparse: at most gamma of pixels
    if name == "jsma_highconf":  # goes on past the boundary on a few dozen pixels
        logits = clf.predict(adv[hit])
        own = logits[np.arange(hit.sum()), y[hit]]
        other = np.where(np.eye(10, dtype=bool)[y[hit]], -np.inf, logits).max(1)
        assert np.median(other - own) > 2.0
        assert (np.abs(delta) > 1e-6).sum(1).max() <= 0.25 * delta.shape[1]


def test_a_models_attack_scale_scales_the_norm_budgets_only():
    """models/photo's attack_scale (0.157) turns the MNIST budgets into natural-image ones; unbounded attacks and
    search settings stay; the cache key follows the parameters, so a rescaled budget is never served stale."""
    from nccr_guard.eval.attacks import attack_key, attack_table
    from nccr_guard.manifest import load_manifest
    from tests.conftest import MNIST, ROOT

    mnist, photo = attack_table(load_manifest(MNIST)), attack_table(load_manifest(ROOT / "models" / "photo"))
    assert mnist == ATTACKS
    assert photo["fgsm"].params["eps"] == pytest.approx(8 / 255, rel=0.01)
    assert photo["pgd"].params["eps_step"] == pytest.approx(0.01 * 0.157)
    assert photo["pgd"].params["max_iter"] == mnist["pgd"].params["max_iter"]
    assert photo["pgd_minimal"].params["eps_grid"][-1] == pytest.approx(0.3 * 0.157)
    assert photo["pgd_l2"].params["eps"] == pytest.approx(0.471)
    for name in ("cw_l2", "ead", "deepfool", "jsma", "hopskipjump"):
        assert photo[name] == mnist[name]
    assert attack_key(photo, "fgsm") != attack_key(mnist, "fgsm")
    assert attack_key(photo, "cw_l2") == attack_key(mnist, "cw_l2")
    audio = attack_table(load_manifest(ROOT / "models" / "speaker"))
    assert {"pgd_l2", "cw_l2_conf10"} <= set(audio) and audio["cw_l2_conf10"].strength == "high"
