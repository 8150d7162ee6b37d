"""Named NCCR formulations. The default was chosen by measurement (docs/nccr.md); `plain` is the literal reading.

A variant says which rows to make (perturbations) and what to measure on them (components). Each component
watches one layer under one perturbation; components are standardised against clean calibration data and
combined by their maximum, so one unstable view of the input is enough to raise the score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

from nccr_guard.engine.perturb import RANDOM_FAMILIES, Perturbation, row_groups

Measure = Literal["flip", "change", "pred_flip", "margin", "margin_change"]
MARGIN_MEASURES = ("margin", "margin_change", "pred_flip")  # measures that read the logits, whatever the layer


@dataclass(frozen=True)
class Component:
    """Watch `layer` under the perturbation with key `perturbation` and measure how its neurons move.

    flip: share of (neuron, copy) pairs whose cover state (activation > per-neuron clean threshold) changes.
    change: mean |Δ activation| / the neuron's clean RMS change under the same perturbation (a soft cover change).
    pred_flip: share of copies whose top class differs from the original's (the logit layer's cover change), by
        more than float noise (score.FLIP_TOLERANCE).
    margin: mean drop of the top-class logit margin relative to the original margin (how far the decision
        neuron moves towards its cover threshold).
    margin_change: the same in both directions, |Δ margin| / |margin|.
    """

    perturbation: str
    layer: str
    measure: Measure
    selection: Literal["all", "class"] = "all"
    reduce: Literal["mean", "max"] = "mean"

    @cached_property  # asked once per verdict on the serving path
    def name(self) -> str:
        return f"{self.measure}[{self.layer}/{self.selection}]@{self.perturbation}/{self.reduce}"


@dataclass(frozen=True)
class Schedule:
    """Sequential testing (engine/sequential.py): `first` copies per noise family in the first round, `step` more
    per later round, stop once the fixed-K verdict lies outside a bound of `z` standard errors.

    `first_by`: (family, copies) pairs for families whose first round differs, e.g. (("sweep", 2),): a mean
    over copies needs two of them for a standard error, a 0/1 flip rate with a clean prior settles from one."""

    first: int = 2
    step: int = 2
    z: float = 2.0
    first_by: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        firsts = [self.first, *(n for _, n in self.first_by)]
        if min(firsts) < 1 or self.step < 1 or self.z <= 0:
            raise ValueError("sequential schedule needs first >= 1, step >= 1, z > 0")

    def first_for(self, family: str) -> int:
        return dict(self.first_by).get(family, self.first)

    @property
    def first_label(self) -> str:
        """The first round, with per-family firsts: '1 (sweep 2)'."""
        return f"{self.first}" + "".join(f" ({f} {n})" for f, n in self.first_by)

    @property
    def label(self) -> str:
        """first/step/z, with per-family firsts: '1 (sweep 2)/2/2'."""
        return f"{self.first_label}/{self.step}/{self.z:g}"

    @classmethod
    def parse(cls, label: str) -> Schedule:
        """The schedule a `label` names ('1 (sweep 3)/1/1.5'), as the reports' tables write it: the one syntax
        users read in docs/nccr.md is the one they give `--sequential-schedule`."""
        m = _SCHEDULE.fullmatch(label.strip())
        if not m:
            raise ValueError(
                f"sequential schedule {label!r}: expected first/step/z, with optional per-family firsts, "
                "e.g. '1 (sweep 3)/1/1.5'"
            )
        first_by = tuple((f, int(n)) for f, n in re.findall(r"\(\s*([a-z]+)\s+(\d+)\s*\)", m["by"]))
        return cls(int(m["first"]), int(m["step"]), float(m["z"]), first_by)


def parse_schedules(setting: str) -> dict[str | None, Schedule]:
    """`--sequential-schedule`'s value: one label for every model that draws noise copies, or `NAME=LABEL` entries
    separated by ';' for the named models, where a bare label among them covers the others (key None). One
    server may hold several noisy models whose operators want different row budgets."""
    out: dict[str | None, Schedule] = {}
    for entry in (e.strip() for e in setting.split(";")):
        if not entry:
            continue
        name, sep, label = entry.rpartition("=")  # a label never holds '='
        key = name.strip() if sep else None
        if sep and not key:
            raise ValueError(f"sequential schedule entry {entry!r}: no model name before '='")
        if key in out:
            raise ValueError(
                f"sequential schedule: {f'model {key!r}' if key else 'a label for all models'} given twice"
            )
        out[key] = Schedule.parse(label)
    if not out:
        raise ValueError("sequential schedule: empty (give a label such as '1 (sweep 3)/1/1.5', or NAME=LABEL)")
    return out


def unknown_schedule_names(setting: str, served: list[str] | set[str]) -> list[str]:
    """Model names `--sequential-schedule` gives that none of `served` has: a misspelt name would silently leave
    its model on the variant's schedule, so serve and score refuse them."""
    return sorted(set(parse_schedules(setting)) - {None, *served})


_SCHEDULE = re.compile(
    r"(?P<first>\d+)(?P<by>(?:\s*\(\s*[a-z]+\s+\d+\s*\))*)\s*/\s*(?P<step>\d+)\s*/\s*(?P<z>\d+(?:\.\d*)?|\.\d+)"
)


@dataclass(frozen=True)
class Variant:
    name: str
    perturbations: tuple[Perturbation, ...]
    components: tuple[Component, ...]
    description: str = ""
    threshold_quantile: float = 0.5
    top_m: int = 20
    # The model-level NCCR: mean of this absolute (not standardised) component over clean data.
    robustness: Component = field(default_factory=lambda: Component("gaussian:0.1", "*", "flip", "class"))
    # Sequential testing over the noise copies; None: always all K (variants without noise copies need none).
    sequential: Schedule | None = None
    # Rows made only for the model-level NCCR, when its perturbation is none of the verdict's: calibration and
    # `nccr-guard robustness` forward them apart (robustness_variant), so verdicts never pay for them.
    robustness_rows: Perturbation | None = None
    # How standardised components become one score (engine/combiner.py): their max, or a logistic regression's
    # weighted sum, whose weights calibration fits on clean, benignly shifted and adversarial dev inputs.
    combiner: Literal["max", "logistic"] = "max"
    combiner_c: float = 100.0  # the logistic combiner's inverse regularisation strength (combiner.fit_logistic)

    def __post_init__(self) -> None:
        if self.combiner == "logistic" and self.sequential is not None:
            raise ValueError(f"{self.name}: sequential testing bounds a max of components, not a weighted sum")
        keys = {p.key for p in self.perturbations}
        for c in self.components:
            if c.perturbation not in keys:
                raise ValueError(f"{self.name}: component {c.name} uses unknown perturbation {c.perturbation}")
        own = self.robustness_rows
        if self.robustness.perturbation not in keys | ({own.key} if own else set()):
            raise ValueError(f"{self.name}: robustness {self.robustness.name} uses an unknown perturbation")
        if own and self.robustness.measure == "change":  # its spread would need calibration rows of `own`
            raise ValueError(f"{self.name}: a `change` robustness measure needs the verdict's own rows")

    def robustness_variant(self) -> Variant:
        """The variant whose rows give the model-level NCCR: this one, or with `robustness_rows` one that makes
        only those rows and measures only the robustness component."""
        if self.robustness_rows is None:
            return self
        return replace(
            self,
            perturbations=(self.robustness_rows,),
            components=(self.robustness,),
            sequential=None,
            robustness_rows=None,
        )

    @cached_property  # asked per request on the serving path; the variant is frozen
    def rows(self) -> int:
        return 1 + sum(p.copies for p in self.perturbations)

    @cached_property
    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @cached_property
    def groups(self) -> dict[str, slice]:
        """Which rows belong to which perturbation (perturb.row_groups), asked per batch on the serving path."""
        return row_groups(self.perturbations)

    @cached_property
    def one_row_margins(self) -> tuple[str, list[int]] | None:
        """(measure, row per component) when every component measures one squeezed row's logit margin the same
        way (the image default, nccr-v3): scoring then reads all of them in one gather over the margins instead
        of a chain of small array operations per component, which at one 28x28 input per call cost more than its
        forward (score.raw_components)."""
        measures = {c.measure for c in self.components}
        if len(measures) != 1 or not measures <= {"margin", "margin_change"}:
            return None
        rows = [self.groups[c.perturbation] for c in self.components]
        if any(r.stop - r.start != 1 for r in rows):
            return None
        return measures.pop(), [r.start for r in rows]

    def with_k(self, k: int) -> Variant:
        """The same variant with `k` copies for every noise family (squeezers stay one row each)."""
        return replace(self, perturbations=tuple(p.with_copies(k) for p in self.perturbations))

    def with_schedule(self, schedule: Schedule) -> Variant:
        """The same variant tested sequentially by `schedule` (any variant with noise copies can be). Refuses a
        per-family first for a family the variant does not draw: a typo would silently fall back to `first`."""
        noisy = {p.family for p in self.perturbations if p.family in RANDOM_FAMILIES}
        if self.combiner != "max":
            raise ValueError(f"{self.name} combines its components by a weighted sum: no sequential schedule stops it")
        if not noisy:
            raise ValueError(f"{self.name} draws no noise copies: a sequential schedule has nothing to stop")
        unknown = sorted({f for f, _ in schedule.first_by} - noisy)
        if unknown:
            raise ValueError(
                f"sequential schedule {schedule.label!r} names {', '.join(unknown)}, which {self.name} does not draw "
                f"(its noise families: {', '.join(sorted(noisy))})"
            )
        return replace(self, sequential=schedule)

    def copy_layers(self, model_layers: list[str]) -> list[str] | None:
        """The watched layers the verdict reads from perturbed copies, or None when it reads their logits (then
        the copies need the whole network). Copies need the network only up to the deepest of these layers."""
        out: list[str] = []
        for c in self.components:
            if c.measure in MARGIN_MEASURES or c.layer in ("*", "logits", "probs"):
                return None
            layer = model_layers[-1] if c.layer == "last" else c.layer
            if layer not in out:
                out.append(layer)
        return out

    def layers(self, model_layers: list[str]) -> list[str]:
        """The layers this variant reads, '*' expanded to all of the model's watched layers plus logits."""
        out: list[str] = []
        for c in (*self.components, self.robustness):
            for layer in [*model_layers, "logits"] if c.layer == "*" else [c.layer]:
                if layer not in out:
                    out.append(layer)
        return out


def every_component(perturbations: tuple[Perturbation, ...], layers: list[str]) -> tuple[Component, ...]:
    """Every reading of every perturbation: each layer key of `layers` under flip and change, all neurons and
    per-class ones, mean (and for noise families max) over copies; the logit-margin measures; and the change of
    the softmax. The formulation search's candidates (eval/search.py, eval/lofo.py) and nccr-v4's components."""
    comps: list[Component] = []
    for p in perturbations:
        reduces = ("mean", "max") if p.family in RANDOM_FAMILIES else ("mean",)
        for layer in layers:
            for measure in ("flip", "change"):
                for sel in ("all", "class"):
                    comps += [Component(p.key, layer, measure, sel, r) for r in reduces]
        comps += [Component(p.key, "logits", m, "all", "mean") for m in ("pred_flip", "margin", "margin_change")]
    return (*comps, *(Component(p.key, "probs", "change") for p in perturbations))


IMAGE_NOISE = (
    *(Perturbation("gaussian", s, 12) for s in (0.02, 0.05, 0.1, 0.2)),
    *(Perturbation("uniform", s, 12) for s in (0.1, 0.2)),
)
IMAGE_SQUEEZE = (*(Perturbation("bitdepth", b) for b in (1, 2, 3)), *(Perturbation("median", s) for s in (2, 3)))

SQUEEZERS = (
    Perturbation("bitdepth", 1),
    Perturbation("bitdepth", 2),
    Perturbation("median", 2),
    Perturbation("median", 3),
)

PLAIN = Variant(
    name="plain",
    perturbations=(Perturbation("gaussian", 0.05, 16), Perturbation("gaussian", 0.1, 16)),
    components=(Component("gaussian:0.05", "*", "flip"),),
    description="binary cover flips of all watched neurons, per-neuron median thresholds, Gaussian noise "
    "(the literal reading)",
)

# First search protocol (dev split, FGSM only; reports/search/fgsm/): the best component of each perturbation
# family. Perfect on FGSM/PGD, but blind near the decision boundary (held-out CW-L2 AUROC 0.70): kept for the record.
SQUEEZE_FLIP = Variant(
    name="squeeze-flip",
    perturbations=(Perturbation("bitdepth", 2), Perturbation("uniform", 0.2, 12)),
    components=(
        Component("bitdepth:2", "last", "change", "all", "mean"),
        Component("uniform:0.2", "*", "flip", "class", "max"),
    ),
    description="normalised change of the deepest watched layer under 2-bit squeezing, max with the cover-flip "
    "rate of class-selected neurons under uniform noise (worst copy)",
    robustness=Component("uniform:0.2", "*", "flip", "class", "mean"),
)

# Second protocol (reports/search/fgsm-deepfool/): greedy max-combination ranked by the worst dev AUROC
# over one high-confidence (FGSM) and one minimal (DeepFool) attack. Watches the logit layer: how far the
# predicted class's margin moves towards its cover threshold (margin) and how far all logits move relative to
# their clean spread (change), under 1- and 3-bit squeezing and small Gaussian noise.
NCCR_V2 = Variant(
    name="nccr-v2",
    perturbations=(Perturbation("bitdepth", 1), Perturbation("bitdepth", 3), Perturbation("gaussian", 0.02, 12)),
    components=(
        Component("bitdepth:1", "logits", "margin", "all", "mean"),
        Component("bitdepth:3", "logits", "change", "all", "mean"),
        Component("gaussian:0.02", "logits", "margin", "all", "mean"),
    ),
    description="logit-margin drop under 1-bit squeezing and under small Gaussian noise, max with the normalised "
    "logit change under 3-bit squeezing",
    robustness=Component("bitdepth:1", "*", "flip", "class", "mean"),
)

# The default (docs/nccr.md; reports/search/fgsm-deepfool-cw/): greedy max-combination ranked by the worst
# dev AUROC over FGSM, DeepFool and CW-L2. It watches the decision neuron of the logit layer: how far, relative
# to its own margin, the top class's margin over the runner-up moves when the input is squeezed to 1, 2 and
# 3 bits. Clean inputs sit deep inside their class and barely move; adversarial ones sit near a boundary they
# were pushed across, or on a fragile high-frequency pattern that squeezing erases.
NCCR_V3 = Variant(
    name="nccr-v3",
    perturbations=(Perturbation("bitdepth", 3), Perturbation("bitdepth", 1), Perturbation("bitdepth", 2)),
    components=(
        Component("bitdepth:3", "logits", "margin_change", "all", "mean"),
        Component("bitdepth:1", "logits", "margin_change", "all", "mean"),
        Component("bitdepth:2", "logits", "margin_change", "all", "mean"),
    ),
    description="relative change of the logit margin under 3-, 1- and 2-bit squeezing, max-combined",
    # Model-level NCCR: the decision neuron's mean relative margin drop under Gaussian noise (sigma 0.1, 16
    # copies), picked by a rule fixed in advance from 15 candidates on five MNIST models and checked on five more
    # (docs/nccr.md, "Model-level NCCR"); the 1-bit cover-flip rate used before ranked robustness backwards.
    robustness=Component("gaussian:0.1", "logits", "margin", "all", "mean"),
    robustness_rows=Perturbation("gaussian", 0.1, 16),
)

# nccr-v3 plus a 2x2 median squeeze, for high-confidence CW (reports/search/nccr-v3-plus/): `nccr-guard search
# --start-from nccr-v3` with CW-L2 at confidence 10 among the dev attacks. Bit-depth squeezes barely move those
# examples (deep in the wrong class, smooth perturbation); a median filter does move their logits. Greedy steps 1-2
# on dev: how far all logits move relative to their clean spread, and how far the top margin drops. Not the
# default: it costs a fifth row per verdict and some FGSM/PGD TPR (docs/nccr.md, "High-confidence CW").
NCCR_V3_MEDIAN = Variant(
    name="nccr-v3-median",
    perturbations=(*NCCR_V3.perturbations, Perturbation("median", 2)),
    components=(
        *NCCR_V3.components,
        Component("median:2", "logits", "change", "all", "mean"),
        Component("median:2", "logits", "margin", "all", "mean"),
    ),
    description="nccr-v3, max with the normalised logit change and the margin drop under a 2x2 median filter",
    robustness=NCCR_V3.robustness,
    robustness_rows=NCCR_V3.robustness_rows,
)

# The image default (docs/nccr.md, "Leave one family out"; reports/search/lofo/): every component of eleven
# perturbations (four Gaussian and two uniform noise strengths, 1-3 bit squeezes, 2x2 and 3x3 medians), read on
# the deepest watched layer, the logits and both, combined by a logistic regression over their z-scores. Chosen
# by the leave-one-family-out search on the dev split, where a max of a few components picked on some attack
# families broke on the family it never saw (worst held-out family AUROC 0.59) and the regression held. Its
# weights are fitted at calibration on dev inputs: clean digits and their benign shifts (rotation, blur,
# re-encoding, a grey background...) against adversarial examples of every attack family, so a rotated or
# re-encoded upload is not what it learns to flag. Noise copies move every input, binary and constant ones
# included (no fixed points).
NCCR_V4 = Variant(
    name="nccr-v4",
    perturbations=(*IMAGE_NOISE, *IMAGE_SQUEEZE),
    components=every_component((*IMAGE_NOISE, *IMAGE_SQUEEZE), ["last", "logits", "*"]),
    description="logistic combination of the standardised cover changes of 248 readings (deepest watched layer, "
    "logits, softmax; flip, change and margin measures) under Gaussian and uniform noise, bit-depth squeezes and "
    "median filters",
    combiner="logistic",
    robustness=NCCR_V3.robustness,
    robustness_rows=NCCR_V3.robustness_rows,
)

# The photo model's pick (reports/search/lofo-photo): the same readings under weaker regularisation. On 32 px
# photo crops C 100 flags noisy and zoomed-out crops 14-16 %; C 1000 is the only regression whose false alarms
# stay within the goals, at a worst held-out family of 0.908 (nccr-v3: 0.203).
NCCR_V4_C1000 = replace(
    NCCR_V4,
    name="nccr-v4-c1000",
    description=NCCR_V4.description + " (regularisation C 1000)",
    combiner_c=1000.0,
)

# The audio default (reports/search/speaker/): the same greedy protocol on the speaker model's dev split, worst
# case over FGSM, PGD and CW-L2 on the waveform. Hidden-layer cover flips of the GE2E embedding were weak (AUROC
# <= 0.76); what separates is again the decision neuron: how far the top speaker's logit margin falls when the
# clip is shifted by up to 25 ms, how far it moves under 12-bit quantisation, and how often 20 dB noise changes the
# predicted speaker.
NCCR_AUDIO_V1 = Variant(
    name="nccr-audio-v1",
    perturbations=(Perturbation("shift", 400, 8), Perturbation("bitdepth", 12), Perturbation("snr", 20, 8)),
    components=(
        Component("shift:400", "logits", "margin", "all", "mean"),
        Component("bitdepth:12", "logits", "margin_change", "all", "mean"),
        Component("snr:20", "logits", "pred_flip", "all", "mean"),
    ),
    description="logit-margin drop under time shifts of up to 25 ms, relative margin change under 12-bit "
    "quantisation, and the prediction-flip rate under 20 dB noise, max-combined",
    robustness=Component("shift:400", "*", "flip", "class", "mean"),
    # Chosen on the dev split (reports/sequential/speaker-dev): the fewest clean rows whose worst AUROC loss
    # against fixed K is <= 0.005 (half the 0.01 budget: dev and test differ by that much; a first choice,
    # within 0.01 on dev at z=1, lost 0.023 on the test split's FGSM, docs/nccr.md).
    sequential=Schedule(first=2, step=2, z=2.0),
)

# nccr-audio-v1 with its shifts spread evenly over the range (perturb.py, `sweep`) instead of drawn one by one:
# a clip's margin drop swings with where the shift falls within the spectrogram's 160-sample hop, so eight
# independent shifts are a noisy mean and two are a poor one. Spread shifts keep the mean over the first copies
# close to the mean over all of them, which is what lets sequential testing stop early (docs/nccr.md).
NCCR_AUDIO_V2 = replace(
    NCCR_AUDIO_V1,
    name="nccr-audio-v2",
    perturbations=(Perturbation("sweep", 400, 8), *NCCR_AUDIO_V1.perturbations[1:]),
    components=(Component("sweep:400", "logits", "margin", "all", "mean"), *NCCR_AUDIO_V1.components[1:]),
    description="logit-margin drop under time shifts spread evenly over +-25 ms, relative margin change under "
    "12-bit quantisation, and the prediction-flip rate under 20 dB noise, max-combined",
    robustness=Component("sweep:400", "*", "flip", "class", "mean"),
    # Chosen by nccr-audio-v1's rule, the fewest clean rows whose worst AUROC loss against fixed K is <= 0.005,
    # on both dev samples together (reports/sequential/speaker-dev-pooled, 199 clean clips: 5.17 of 18 rows at
    # 0.0050; between 100-clip samples the loss moves by ~0.01, so one sample chose by the luck of a clip). The
    # first round holds two spread shifts (a mean needs two copies for a standard error) and one noisy copy (its
    # flips settle from one under the clean prior). (1, 2, 2): 7.99 rows at 0.0022 on the same pool.
    # Under the 1,000-clip calibration's higher threshold the same pool gives 5.09 rows at 0.0087 (CW-L2): inside
    # the 0.01 budget, outside the rule's 0.005, verdicts unchanged; three shifts first would keep 0.0037 at 6.06
    # rows, just over 1/3 of K. Kept: 0.0031-0.0087 on all six samples of 199-300 clips, three holdouts made after
    # the choice among them (docs/nccr.md, decision 004); a deployment can pick another with
    # --sequential-schedule.
    sequential=Schedule(first=1, step=1, z=1.5, first_by=(("sweep", 2),)),
)

# A hidden-layer reading: how far the deepest watched layer moves under 2-bit squeezing and under Gaussian noise.
# Weaker than the logit variants on MNIST (reports/search: change[fc1] <= 0.83 AUROC on DeepFool, ~0.55 on
# CW-L2), kept because it is the kind of variant the truncated forward pays off for: no component reads the
# copies' logits, so copies run only up to the watched layer.
HIDDEN_CHANGE = Variant(
    name="hidden-change",
    perturbations=(Perturbation("gaussian", 0.1, 6), Perturbation("bitdepth", 2)),
    components=(
        Component("gaussian:0.1", "last", "change"),
        Component("bitdepth:2", "last", "change"),
    ),
    description="normalised change of the deepest watched layer under Gaussian noise and 2-bit squeezing",
    robustness=Component("gaussian:0.1", "last", "flip"),
)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        PLAIN,
        SQUEEZE_FLIP,
        NCCR_V2,
        NCCR_V3,
        NCCR_V3_MEDIAN,
        NCCR_V4,
        NCCR_V4_C1000,
        NCCR_AUDIO_V1,
        NCCR_AUDIO_V2,
        HIDDEN_CHANGE,
    )
}
DEFAULT_VARIANT = "nccr-v3"


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown NCCR variant {name!r}; known: {', '.join(VARIANTS)}") from None
