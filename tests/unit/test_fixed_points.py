"""No input is a fixed point of the served verdict (issue 35, item 4).

nccr-v3 read only bit-depth squeezes: an image whose pixels are all exactly 0 or 1 comes back unchanged from
each of them, every component is 0, and the score sits at its floor whatever the image shows, so a binarised
adversarial digit was always "clean". The served variant must move every input by some perturbation (median
filters, noise): these tests build binary, constant and saturated images and check that the shipped detector's
components are not all zero and that its score is not the score of all-zero components (with a weighted-sum
combiner that score is no longer the minimum, but an input that scores it tells the detector nothing).
Constant images are nothing like a digit: they are also answered `ood`.
Real components: the committed models/mnist weights and calibration, the numpy engine on torch.
"""

from __future__ import annotations

import numpy as np

from nccr_guard.engine.score import combine


def _cases(digits: np.ndarray) -> dict[str, np.ndarray]:
    d = digits[:6]
    return {
        "binarised digits": (d > 0.5).astype(np.float32),
        "saturated digits": np.clip(d * 4.0, 0.0, 1.0).astype(np.float32),
        "all black": np.zeros_like(d[:1]),
        "all white": np.ones_like(d[:1]),
        "binary checkerboard": (np.indices(d.shape[-2:]).sum(0) % 2).astype(np.float32)[None, None],
    }


def test_binary_constant_and_saturated_images_are_moved_by_some_perturbation(detector, mnist_test):
    floor = float(combine(np.zeros((1, len(detector.variant.components))), detector.calib)[0])
    x, _ = mnist_test
    for name, xs in _cases(x).items():
        for v in detector.detect(xs):
            assert max(v.raw) > 0, f"{name}: every component is 0, a fixed point of the verdict"
            assert abs(v.score - floor) > 1e-3, f"{name}: score {v.score} is the all-zero components' {floor}"
            if name.startswith("all "):
                assert v.ood, f"{name}: a constant image is not flagged out of distribution"


def test_the_binarising_attack_no_longer_reaches_the_floor(detector, mnist_test):
    """The bypass itself: binarised clean digits (what the flip attacker of eval.adaptive starts from) score
    above the floor and spread like other inputs rather than collapsing onto one value."""
    x, _ = mnist_test
    scores = np.array([v.score for v in detector.detect((x[:32] > 0.5).astype(np.float32))])
    assert np.unique(np.round(scores, 6)).size > 16
