"""Attacks from IBM ART around the model's torch module. Each returns adversarial inputs for `x` (n, *shape).

Only successful adversarial examples are scored downstream; the harness filters on the model's predictions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from nccr_guard.datasets import spread_index

if TYPE_CHECKING:
    from nccr_guard.manifest import Manifest


@dataclass(frozen=True)
class AttackSpec:
    """One attack at one setting. `family`: the threat model it stands for (norm or knowledge); `strength`:
    'minimal' stops at (or searches for) the decision boundary, 'high' keeps going or demands a confidence
    margin, the regime instability detectors find hardest (../shared/anchors.md)."""

    name: str
    params: dict = field(default_factory=dict)
    family: str = "linf"
    strength: str = "minimal"


CW_STEPS = {"max_iter": 50, "binary_search_steps": 3, "learning_rate": 0.05}
EAD_STEPS = {"max_iter": 40, "binary_search_steps": 3, "learning_rate": 0.05, "beta": 0.01, "decision_rule": "EN"}

ATTACKS: dict[str, AttackSpec] = {
    a.name: a
    for a in (
        AttackSpec("fgsm", {"norm": "inf", "eps": 0.2}, "linf", "high"),
        AttackSpec("pgd", {"norm": "inf", "eps": 0.2, "eps_step": 0.01, "max_iter": 40}, "linf", "high"),
        AttackSpec(
            "pgd_minimal",
            {
                "norm": "inf",
                "eps_grid": [0.02 * i for i in range(1, 16)],
                "max_iter": 20,
                "rule": "smallest eps of the grid at which ART PGD succeeds",
            },
            "linf",
            "minimal",
        ),
        AttackSpec("cw_l2", {"confidence": 0.0, "initial_const": 1.0, **CW_STEPS}, "l2", "minimal"),
        AttackSpec("deepfool", {"max_iter": 50, "epsilon": 0.02, "nb_grads": 10}, "l2", "minimal"),
        AttackSpec("pgd_highconf", {"norm": "inf", "eps": 0.3, "eps_step": 0.01, "max_iter": 100}, "linf", "high"),
        AttackSpec("cw_l2_conf10", {"confidence": 10.0, "initial_const": 5.0, **CW_STEPS}, "l2", "high"),
        AttackSpec(
            "apgd_ce",
            {"norm": "inf", "eps": 0.3, "eps_step": 0.1, "max_iter": 50, "loss": "cross_entropy"},
            "linf",
            "high",
        ),
        AttackSpec(
            "apgd_dlr",
            {"norm": "inf", "eps": 0.3, "eps_step": 0.1, "max_iter": 50, "loss": "difference_logits_ratio"},
            "linf",
            "minimal",
        ),
        AttackSpec("pgd_l2", {"norm": 2, "eps": 3.0, "eps_step": 0.1, "max_iter": 60}, "l2", "high"),
        AttackSpec("ead", {"confidence": 0.0, "initial_const": 1.0, **EAD_STEPS}, "l1", "minimal"),
        AttackSpec("ead_conf10", {"confidence": 10.0, "initial_const": 5.0, **EAD_STEPS}, "l1", "high"),
        AttackSpec("jsma", {"theta": 1.0, "gamma": 0.1, "target": "random (ART)"}, "l0", "minimal"),
        AttackSpec(
            "jsma_highconf",
            {
                "theta": 1.0,
                "gamma": 0.1,
                "then": "ART PGD-Linf eps 1, 40 steps, on JSMA's pixels and their 4-neighbours",
            },
            "l0",
            "high",
        ),
        AttackSpec("square", {"norm": "inf", "eps": 0.3, "max_iter": 1000, "p_init": 0.8}, "score_bb", "minimal"),
        AttackSpec(
            "square_conf10",
            {"norm": "inf", "eps": 0.3, "max_iter": 1000, "p_init": 0.8, "confidence": 10.0},
            "score_bb",
            "high",
        ),
        # Decision-based attacks see labels only, so they always end at the boundary: the second setting stops
        # after two iterations, with the larger perturbation of an early gradient-estimate step.
        AttackSpec("hopskipjump", {"norm": 2, "max_iter": 10, "max_eval": 1000, "init_eval": 100}, "decision_bb"),
        AttackSpec(
            "hopskipjump_short", {"norm": 2, "max_iter": 2, "max_eval": 1000, "init_eval": 100}, "decision_bb", "high"
        ),
    )
}
FAMILIES = ("linf", "l2", "l1", "l0", "score_bb", "decision_bb")


def attacks_of(families: list[str] | None, table: dict[str, AttackSpec] | None = None) -> list[str]:
    """The attacks of `families` (all of the table's when None), in the table's order."""
    table = ATTACKS if table is None else table
    known = {a.family for a in table.values()}
    unknown = sorted(set(families or ()) - known)
    if unknown:
        raise ValueError(f"unknown attack families {unknown}; known: {', '.join(sorted(known))}")
    return [n for n, a in table.items() if families is None or a.family in families]


# Waveform attacks on the speaker model. Inputs are level-normalised to -30 dBFS (RMS 0.032 of full scale), so an
# L-inf budget of 0.001 is a perturbation about 30 dB below the speech. `pgd_targeted` is impersonation: every clip
# is pushed towards the next enrolled speaker. Both L2 attacks, CW at confidence 0 and 10 and PGD-L2, cover the
# smooth, high-confidence regime the image model found hardest.
AUDIO_CW_STEPS = {"max_iter": 10, "binary_search_steps": 1, "learning_rate": 0.001}
AUDIO_ATTACKS: dict[str, AttackSpec] = {
    a.name: a
    for a in (
        AttackSpec("fgsm", {"norm": "inf", "eps": 0.002}, "linf", "high"),
        AttackSpec("pgd", {"norm": "inf", "eps": 0.001, "eps_step": 0.0001, "max_iter": 20}, "linf", "high"),
        AttackSpec(
            "pgd_targeted",
            {"norm": "inf", "eps": 0.002, "eps_step": 0.0002, "max_iter": 30, "target": "(label + 1) mod speakers"},
            "targeted",
            "high",
        ),
        # ART's CW spends most of its time in line searches: 10 iterations at a small step keep it to minutes.
        AttackSpec(
            "cw_l2",
            {"confidence": 0.0, "initial_const": 1.0, **AUDIO_CW_STEPS},
            "l2",
            "minimal",
        ),
        # A 3 s clip at -30 dBFS has an L2 norm of about 7: eps 0.2 is a perturbation ~31 dB below the speech,
        # the L-inf PGD's budget spread over every sample.
        AttackSpec("pgd_l2", {"norm": 2, "eps": 0.2, "eps_step": 0.02, "max_iter": 20}, "l2", "high"),
        # Logits are 71 x cosine similarity: a margin of 10 is 0.14 of cosine past the next speaker.
        AttackSpec(
            "cw_l2_conf10",
            {"confidence": 10.0, "initial_const": 5.0, **AUDIO_CW_STEPS},
            "l2",
            "high",
        ),
    )
}


BUDGET_KEYS = ("eps", "eps_step", "eps_grid")  # the parameters a norm budget sets; the rest are search settings


def scaled(spec: AttackSpec, scale: float) -> AttackSpec:
    """`spec` with its L-inf / L2 budgets (and their step sizes) times `scale`; unbounded attacks (CW, EAD,
    DeepFool, JSMA, HopSkipJump) are unchanged."""
    if scale == 1.0:
        return spec
    params = {
        k: ([v * scale for v in val] if isinstance(val, list) else val * scale) if k in BUDGET_KEYS else val
        for k, val in spec.params.items()
    }
    return replace(spec, params=params)


def attack_table(manifest: Manifest) -> dict[str, AttackSpec]:
    """The model's attacks: the audio table, or the image table (budgets set for MNIST) scaled by the model's
    `attack_scale` (model.toml; 0.157 turns L-inf 0.2 into 8/255, the usual budget for natural images)."""
    if manifest.modality == "audio":
        return AUDIO_ATTACKS
    return {name: scaled(spec, manifest.attack_scale) for name, spec in ATTACKS.items()}


def attack_key(table: dict[str, AttackSpec], name: str) -> str:
    """A cache name for one attack's examples that changes with its parameters (a rescaled budget included)."""
    digest = hashlib.sha256(json.dumps(table[name].params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def art_classifier(module, input_shape: tuple[int, ...], n_classes: int, value_range: tuple[float, float]):
    """ART's PyTorchClassifier around a torch module that maps model inputs to logits; inputs are cast to
    float32 first (HopSkipJump draws its starting points in float64, which a float32 module refuses)."""
    import torch
    from art.estimators.classification import PyTorchClassifier

    class Float32Classifier(PyTorchClassifier):
        def predict(self, x: np.ndarray, batch_size: int = 128, training_mode: bool = False, **kwargs) -> np.ndarray:
            return super().predict(np.asarray(x, np.float32), batch_size, training_mode, **kwargs)

    return Float32Classifier(
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


def _jsma(clf, x: np.ndarray, p: dict) -> np.ndarray:
    from art.attacks.evasion import SaliencyMapMethod

    return SaliencyMapMethod(clf, theta=p["theta"], gamma=p["gamma"], batch_size=128, verbose=False).generate(x)


def _jsma_highconf(clf, x: np.ndarray, p: dict, seed: int) -> np.ndarray:
    """JSMA's sparse pixel set, then PGD confined to those pixels (ART's `mask`) to drive the wrong class's
    confidence up: an L0 attacker who keeps going once the label has flipped."""
    from art.attacks.evasion import ProjectedGradientDescent
    from scipy.ndimage import binary_dilation

    sparse = _jsma(clf, x, p)
    # JSMA saturates its pixels, so PGD gets them and their 4-neighbours: still a few dozen pixels of 784.
    cross = np.zeros((1,) * (x.ndim - 2) + (3, 3), bool)
    cross[..., 1, :] = cross[..., :, 1] = True
    mask = binary_dilation(np.abs(sparse - x) > 1e-6, structure=cross).astype(np.float32)
    lo, hi = clf.clip_values
    np.random.seed(seed)
    pgd = ProjectedGradientDescent(
        clf,
        norm=np.inf,
        eps=float(hi - lo),
        eps_step=0.05,
        max_iter=40,
        num_random_init=0,
        batch_size=128,
        verbose=False,
    )
    return pgd.generate(sparse, y=np.eye(clf.nb_classes, dtype=np.float32)[clf.predict(x).argmax(1)], mask=mask)


def _square(clf, x: np.ndarray, p: dict, seed: int) -> np.ndarray:
    """ART's Square attack (score-based black box); with `confidence` a success needs the best wrong logit to
    beat the true one by that margin, so queries go on past the boundary."""
    from art.attacks.evasion import SquareAttack

    kappa = p.get("confidence", 0.0)

    def margin(y_pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True logit minus the best other (ART's own loss takes the second-highest logit, which is the true
        class once the label has flipped, so it stops improving at the boundary)."""
        true = y.argmax(1)
        other = np.where(np.eye(y_pred.shape[1], dtype=bool)[true], -np.inf, y_pred).max(1)
        return y_pred[np.arange(len(y)), true] - other

    def beyond(y_pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        return margin(y_pred, y) < -kappa

    np.random.seed(seed)
    return SquareAttack(
        clf,
        norm=np.inf,
        eps=p["eps"],
        max_iter=p["max_iter"],
        p_init=p["p_init"],
        adv_criterion=beyond,
        batch_size=128,
        verbose=False,
    ).generate(x, y=np.eye(clf.nb_classes, dtype=np.float32)[clf.predict(x).argmax(1)])


def _art_makers(clf, x: np.ndarray, p: dict, seed: int) -> dict[str, Callable[[], np.ndarray]]:
    from art.attacks.evasion import (
        AutoProjectedGradientDescent,
        CarliniL2Method,
        DeepFool,
        ElasticNet,
        FastGradientMethod,
        HopSkipJump,
        ProjectedGradientDescent,
    )

    def cw() -> np.ndarray:
        keys = ("confidence", "max_iter", "binary_search_steps", "initial_const", "learning_rate")
        return CarliniL2Method(clf, **{k: p[k] for k in keys}, batch_size=128, verbose=False).generate(x)

    def ead() -> np.ndarray:
        keys = ("confidence", "max_iter", "binary_search_steps", "initial_const", "learning_rate", "beta")
        return ElasticNet(
            clf, **{k: p[k] for k in keys}, decision_rule=p["decision_rule"], batch_size=128, verbose=False
        ).generate(x)

    def apgd() -> np.ndarray:
        return AutoProjectedGradientDescent(
            clf,
            norm=np.inf,
            eps=p["eps"],
            eps_step=p["eps_step"],
            max_iter=p["max_iter"],
            nb_random_init=1,
            loss_type=p["loss"],
            batch_size=128,
            verbose=False,
        ).generate(x)

    def pgd_l2() -> np.ndarray:
        return ProjectedGradientDescent(
            clf,
            norm=2,
            eps=p["eps"],
            eps_step=p["eps_step"],
            max_iter=p["max_iter"],
            num_random_init=0,
            batch_size=128,
            verbose=False,
        ).generate(x)

    def hsj() -> np.ndarray:
        return HopSkipJump(
            clf,
            norm=2,
            max_iter=p["max_iter"],
            max_eval=p["max_eval"],
            init_eval=p["init_eval"],
            batch_size=128,
            verbose=False,
        ).generate(x)

    return {
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
        "cw_l2": cw,
        "cw_l2_conf10": cw,
        "apgd_ce": apgd,
        "apgd_dlr": apgd,
        "pgd_l2": pgd_l2,
        "ead": ead,
        "ead_conf10": ead,
        "jsma": lambda: _jsma(clf, x, p),
        "jsma_highconf": lambda: _jsma_highconf(clf, x, p, seed),
        "square": lambda: _square(clf, x, p, seed),
        "square_conf10": lambda: _square(clf, x, p, seed),
        "hopskipjump": hsj,
        "hopskipjump_short": hsj,
    }


def run_attack(name: str, clf, x: np.ndarray, seed: int = 0, table: dict[str, AttackSpec] = ATTACKS) -> np.ndarray:
    if name not in table:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(table)}")
    np.random.seed(seed)
    return _art_makers(clf, x, table[name].params, seed)[name]().astype(np.float32)
