"""The score-aware attacker of eval.adaptive on the shipped MNIST model: plain PGD first, then the two-phase
attacker lowers the surrogate score while the input stays misclassified, within the same L-inf budget."""

from __future__ import annotations

import numpy as np
import torch

from nccr_guard.datasets import load_split
from nccr_guard.detector import Detector
from nccr_guard.eval.adaptive import SurrogateScore, adaptive_attack, two_phase_attack
from tests.conftest import MNIST


def test_two_phase_stays_misclassified_within_the_budget_and_lowers_the_surrogate_score():
    det = Detector.load(MNIST, backend="torch", device="cpu", seed=0)
    xs, ys = load_split(det.manifest, "test")
    xs, ys = xs[:8], ys[:8]
    eps = 0.2
    start = adaptive_attack(det, xs, ys, eps, 0.0, 10, 0)
    adv = two_phase_attack(det, xs, ys, start, eps, 8, 0)
    assert adv.shape == xs.shape and adv.dtype == np.float32
    assert np.abs(adv - xs).max() <= eps + 1e-6 and adv.min() >= 0.0 and adv.max() <= 1.0
    model = det.backend.tapped
    with torch.no_grad():
        pred_start = model(torch.as_tensor(start))[0].argmax(1).numpy()
        pred_adv = model(torch.as_tensor(adv))[0].argmax(1).numpy()
    wrong = pred_start != ys
    assert wrong.sum() >= 4  # PGD at 0.2 misclassifies most digits
    assert (pred_adv[wrong] != ys[wrong]).all()  # phase 2 keeps every misclassified input misclassified
    torch.manual_seed(1)
    sur = SurrogateScore(det)
    with torch.no_grad():
        before = np.mean([sur(torch.as_tensor(start[wrong]))[1].numpy() for _ in range(4)], 0)
        after = np.mean([sur(torch.as_tensor(adv[wrong]))[1].numpy() for _ in range(4)], 0)
    assert after.mean() < before.mean()  # it hides: the detector's statistic falls
