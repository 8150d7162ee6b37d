"""Attacks from IBM ART around the model's torch module. Each returns adversarial inputs for `x` (n, *shape).

Only successful adversarial examples are scored downstream; the harness filters on the model's predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nccr_guard.datasets import spread_index


@dataclass(frozen=True)
class AttackSpec:
    name: str
    params: dict = field(default_factory=dict)


ATTACKS: dict[str, AttackSpec] = {
    a.name: a
    for a in (
        AttackSpec("fgsm", {"norm": "inf", "eps": 0.2}),
        AttackSpec("pgd", {"norm": "inf", "eps": 0.2, "eps_step": 0.01, "max_iter": 40}),
        AttackSpec(
            "pgd_minimal",
            {
                "norm": "inf",
                "eps_grid": [0.02 * i for i in range(1, 16)],
                "max_iter": 20,
                "rule": "smallest eps of the grid at which ART PGD succeeds",
            },
        ),
        AttackSpec(
            "cw_l2",
            {"confidence": 0.0, "max_iter": 50, "binary_search_steps": 3, "initial_const": 1.0, "learning_rate": 0.05},
        ),
        AttackSpec("deepfool", {"max_iter": 50, "epsilon": 0.02, "nb_grads": 10}),
        AttackSpec("pgd_highconf", {"norm": "inf", "eps": 0.3, "eps_step": 0.01, "max_iter": 100}),
        AttackSpec(
            "cw_l2_conf10",
            {"confidence": 10.0, "max_iter": 50, "binary_search_steps": 3, "initial_const": 5.0, "learning_rate": 0.05},
        ),
    )
}


# Waveform attacks on the speaker model. Inputs are level-normalised to -30 dBFS (RMS 0.032 of full scale), so an
# L-inf budget of 0.001 is a perturbation about 30 dB below the speech. `pgd_targeted` is impersonation: every clip
# is pushed towards the next enrolled speaker.
AUDIO_ATTACKS: dict[str, AttackSpec] = {
    a.name: a
    for a in (
        AttackSpec("fgsm", {"norm": "inf", "eps": 0.002}),
        AttackSpec("pgd", {"norm": "inf", "eps": 0.001, "eps_step": 0.0001, "max_iter": 20}),
        AttackSpec(
            "pgd_targeted",
            {"norm": "inf", "eps": 0.002, "eps_step": 0.0002, "max_iter": 30, "target": "(label + 1) mod speakers"},
        ),
        # ART's CW spends most of its time in line searches: 10 iterations at a small step keep it to minutes.
        AttackSpec(
            "cw_l2",
            {"confidence": 0.0, "max_iter": 10, "binary_search_steps": 1, "initial_const": 1.0, "learning_rate": 0.001},
        ),
    )
}


def attack_table(modality: str) -> dict[str, AttackSpec]:
    return AUDIO_ATTACKS if modality == "audio" else ATTACKS


def art_classifier(module, input_shape: tuple[int, ...], n_classes: int, value_range: tuple[float, float]):
    """ART's PyTorchClassifier around a torch module that maps model inputs to logits."""
    import torch
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        module,
        torch.nn.CrossEntropyLoss(),
        input_shape=input_shape,
        nb_classes=n_classes,
        clip_values=tuple(value_range),
        device_type="cpu",
    )


def _pgd(
    clf, x: np.ndarray, eps: float, eps_step: float, max_iter: int, seed: int, y: np.ndarray | None = None
) -> np.ndarray:
    """ART PGD-L-inf; with `y` (one-hot targets) a targeted attack."""
    from art.attacks.evasion import ProjectedGradientDescent

    np.random.seed(seed)
    return ProjectedGradientDescent(
        clf,
        norm=np.inf,
        eps=eps,
        eps_step=eps_step,
        max_iter=max_iter,
        targeted=y is not None,
        num_random_init=0,
        batch_size=128,
        verbose=False,
    ).generate(x, y=y)


def _pgd_minimal(clf, x: np.ndarray, p: dict, seed: int) -> np.ndarray:
    """Early-stopped PGD: each input keeps the first (smallest-eps) grid point at which it is misclassified."""
    y0 = clf.predict(x).argmax(1)
    out, done = x.copy(), np.zeros(len(x), bool)
    for eps in p["eps_grid"]:
        todo = np.flatnonzero(~done)
        if not len(todo):
            break
        adv = _pgd(clf, x[todo], eps, eps / 8, p["max_iter"], seed)
        hit = clf.predict(adv).argmax(1) != y0[todo]
        out[todo[hit]], done[todo[hit]] = adv[hit], True
    return out


def correctly_classified(det, split: str, n: int, exclude: int = 0) -> tuple[object, np.ndarray, np.ndarray, float]:
    """The detector's model as an ART classifier, the up-to-`n` inputs of `split` (spread over its classes) that
    it classifies correctly with their labels, and its accuracy on them: what every attack run starts from.
    `exclude`: leave out the inputs a run with n=`exclude` picks (a second, untouched sample of the split)."""
    from nccr_guard.backends.torch_backend import load_module
    from nccr_guard.datasets import load_split, split_size

    m = det.manifest
    # Positions first, then load only those: a speaker split is synthesised and decoded clip by clip. The picks
    # are what the cached attacks and reports are keyed on, so they stay those of spreading the loaded split.
    pos = np.arange(split_size(m, split))
    if exclude:
        pos = np.delete(pos, spread_index(len(pos), exclude))
    xs, ys = load_split(m, split, index=pos[spread_index(len(pos), n)])
    module = det.backend.module if hasattr(det.backend, "module") else load_module(m)
    clf = art_classifier(module, tuple(m.input.shape), len(m.labels), m.input.range)
    ok = clf.predict(xs).argmax(1) == ys
    return clf, xs[ok], ys[ok], float(ok.mean())


def spread(xs: np.ndarray, ys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `n` inputs spaced evenly through a split (splits are ordered by class: the first n would not be)."""
    if n >= len(xs):
        return xs, ys
    idx = spread_index(len(xs), n)
    return xs[idx], ys[idx]


def impersonation_target(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The class a targeted attack aims each input at: the next class after its own."""
    return (labels + 1) % n_classes


def attack_succeeded(name: str, pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Untargeted: the label changed. Targeted (impersonation): the label became the target."""
    return pred == impersonation_target(y, n_classes) if name.endswith("_targeted") else pred != y


def impersonation_targets(clf, x: np.ndarray) -> np.ndarray:
    """One-hot targets for ART from the inputs' predicted labels."""
    n = clf.nb_classes
    return np.eye(n, dtype=np.float32)[impersonation_target(clf.predict(x).argmax(1), n)]


def run_attack(name: str, clf, x: np.ndarray, seed: int = 0, table: dict[str, AttackSpec] = ATTACKS) -> np.ndarray:
    from art.attacks.evasion import CarliniL2Method, DeepFool, FastGradientMethod

    if name not in table:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(table)}")
    p = table[name].params
    makers: dict[str, Callable[[], np.ndarray]] = {
        "fgsm": lambda: FastGradientMethod(clf, norm=np.inf, eps=p["eps"], batch_size=128).generate(x),
        "pgd": lambda: _pgd(clf, x, p["eps"], p["eps_step"], p["max_iter"], seed),
        "pgd_highconf": lambda: _pgd(clf, x, p["eps"], p["eps_step"], p["max_iter"], seed),
        "pgd_minimal": lambda: _pgd_minimal(clf, x, p, seed),
        "pgd_targeted": lambda: _pgd(
            clf, x, p["eps"], p["eps_step"], p["max_iter"], seed, impersonation_targets(clf, x)
        ),
        "deepfool": lambda: DeepFool(
            clf, max_iter=p["max_iter"], epsilon=p["epsilon"], nb_grads=p["nb_grads"], batch_size=128, verbose=False
        ).generate(x),
    }
    for cw in ("cw_l2", "cw_l2_conf10"):
        makers[cw] = lambda: CarliniL2Method(
            clf,
            confidence=p["confidence"],
            max_iter=p["max_iter"],
            binary_search_steps=p["binary_search_steps"],
            initial_const=p["initial_const"],
            learning_rate=p["learning_rate"],
            batch_size=128,
            verbose=False,
        ).generate(x)
    return makers[name]().astype(np.float32)
