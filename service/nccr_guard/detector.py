"""A model ready to give verdicts: manifest + backend + NCCR variant + calibration, checked against each other.

Shared by the server, the CLI and the evaluation harness. Input arrays are in model-input space (the
manifest's shape and value range, before normalisation); perturbations are applied there.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nccr_guard.backends import Backend, make_backend, merge_rows
from nccr_guard.backends.onnx_verdict import VerdictGraph, verdict_graph
from nccr_guard.engine import Calibration, Scores, Variant, build_batch, get_variant, score_rows
from nccr_guard.engine.perturb import LazyRows
from nccr_guard.engine.score import ood_spread
from nccr_guard.engine.sequential import Schedule, bounded_scores, layout, max_copies, rounds, settled
from nccr_guard.engine.variants import parse_schedules
from nccr_guard.manifest import Manifest, ManifestError, load_manifest, loaded_files, weight_hashes

log = logging.getLogger(__name__)

VERDICTS = ("clean", "adversarial")  # what Verdict.verdict can be


@dataclass(slots=True)
class Verdict:
    """One input's verdict. Built positionally, slotted, and with the component values as they come (the dict
    only on demand), because one is built per input on every call: keyword arguments and a dict per verdict
    were most of the Python around a fused verdict (`python -m bench.fused_parts`, docs/performance.md: 77-106 ->
    24-25 us at 32 inputs)."""

    verdict: str
    score: float
    threshold: float
    p_value: float
    index: int
    label: str
    confidence: float
    passes: int
    raw: Sequence[float] = ()  # each component's raw value, in the order of `names`
    names: Sequence[str] = ()
    ood: bool = False  # the input's instability profile is unlike the clean calibration data's (score.ood_spread)

    @property
    def components(self) -> dict[str, float]:
        return dict(zip(self.names, self.raw, strict=True))

    @property
    def adversarial(self) -> bool:
        return self.verdict == "adversarial"


@dataclass
class Job:
    """One input's sequential verdict in progress: its fixed-K rows, built as rounds reach them, forwarded round by
    round, so the batcher can mix requests at different rounds in one forward."""

    rows: LazyRows  # (R, *shape): the rows the fixed-K verdict would use, built as rounds need them
    acts: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (R, N), filled as rounds run
    round: int = 0
    forwarded: int = 0  # rows forwarded so far
    verdict: Verdict | None = None

    @property
    def done(self) -> bool:
        return self.verdict is not None


def check_hashes(manifest: Manifest, calib: Calibration, backend_name: str) -> None:
    """Refuse artifacts made for other weights: a threshold fitted on one model means nothing on another. Every
    file the backend loads is checked, an ONNX file's external data (`model.onnx.data`) too; one that the
    calibration has no record of (made before external data were hashed) is warned about."""
    made_for = calib.meta.get("weights_sha256", {})
    main, *data = loaded_files(manifest, backend_name) or [None]
    have = weight_hashes(manifest, [f for f in (main, *data) if f])
    for file in (main, *data):
        if file in data and file not in made_for:
            log.warning(
                "%s: the calibration has no sha256 of %s (it predates hashing external data): swapped weights "
                "there would go unnoticed; run `nccr-guard calibrate --model %s`",
                manifest.calibration_path,
                file,
                manifest.root,
            )
        elif file not in made_for or made_for[file] != have.get(file or ""):
            raise ManifestError(
                f"{manifest.calibration_path}: calibration was made for {file} with sha256 "
                f"{str(made_for.get(file))[:12]}…, but the file has {str(have.get(file or ''))[:12]}…; run "
                f"`nccr-guard calibrate --model {manifest.root}`"
            )


class Detector:
    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        variant: Variant,
        calib: Calibration | None,
        seed: int = 0,
        sequential: bool = True,
        truncate: bool = True,
        fuse: bool = True,
    ) -> None:
        self.manifest, self.backend, self.variant, self.calib, self.seed = manifest, backend, variant, calib, seed
        self.use_sequential, self.use_truncation, self.use_fused = sequential, truncate, fuse
        self._fused_for: tuple = (None, None, None)  # (variant, calibration, fused run or None) last built
        spec = manifest.input.image
        self._mean = np.array(spec.mean if spec else [0.0], np.float32).reshape(
            -1, *[1] * (len(manifest.input.shape) - 1)
        )
        self._std = np.array(spec.std if spec else [1.0], np.float32).reshape(self._mean.shape)
        self._identity = not self._mean.any() and bool((self._std == 1).all())  # normalisation would be a copy

    @classmethod
    def load(
        cls,
        folder: Path | str,
        backend: str = "auto",
        device: str = "auto",
        k: int | None = None,
        seed: int = 0,
        threads: int = 0,
        calibrated: bool = True,
        half: bool = False,
        sequential: bool = True,
        truncate: bool = True,
        cuda_graphs: bool = True,
        schedule: Schedule | str | None = None,
        fuse: bool = True,
    ) -> Detector:
        """`schedule`: a sequential schedule replacing the variant's, for a variant that draws noise copies: a
        Schedule, or `--sequential-schedule`'s text (a label for every model, or `NAME=LABEL; ...` entries,
        variants.parse_schedules). A schedule for every model is ignored for a variant that draws no noise copies
        (nothing to stop), so one setting serves a mixed fleet; one that names this model is refused."""
        manifest = load_manifest(folder)
        be = make_backend(backend, manifest, device=device, threads=threads, half=half, cuda_graphs=cuda_graphs)
        calib = None
        variant = get_variant(manifest.variant)
        if calibrated:
            if not manifest.calibration_path.exists():
                raise ManifestError(f"{manifest.calibration_path} missing: run `nccr-guard calibrate --model {folder}`")
            calib = Calibration.load(manifest.calibration_path)
            check_hashes(manifest, calib, be.name)
            variant = get_variant(calib.variant)
            if variant.combiner == "logistic" and calib.weights is None:
                raise ManifestError(
                    f"{manifest.calibration_path}: {variant.name} needs fitted combiner weights; recalibrate with "
                    f"`nccr-guard calibrate --model {folder}`"
                )
        k = k or manifest.k or (calib.meta.get("k") if calib else None)
        if k:
            variant = variant.with_k(int(k))
        if isinstance(schedule, str):
            chosen = parse_schedules(schedule)
            named = manifest.name in chosen
            schedule = chosen.get(manifest.name, chosen.get(None))
            if named and max_copies(variant) == 0:
                raise ManifestError(
                    f"--sequential-schedule names {manifest.name}, whose variant {variant.name} draws no noise copies"
                )
            if named and variant.combiner != "max":
                raise ManifestError(
                    f"--sequential-schedule names {manifest.name}, whose variant {variant.name} combines its "
                    "readings by a weighted sum, which no sequential schedule stops"
                )
        # a schedule for every model passes over the variants it cannot stop (no noise copies, a weighted sum)
        if schedule is not None and max_copies(variant) > 0 and variant.combiner == "max":
            variant = variant.with_schedule(schedule)
        if calib and calib.meta.get("k") and int(calib.meta["k"]) != int(k or 0):
            log.warning("K=%s differs from the calibrated K=%s: the false-positive rate may drift", k, calib.meta["k"])
        return cls(manifest, be, variant, calib, seed, sequential, truncate, fuse)

    @property
    def rows_per_input(self) -> int:
        """Rows of a fixed-K verdict: the most a sequential one forwards."""
        return self.variant.rows

    @property
    def truncation(self) -> list[str] | None:
        """Layers the perturbed copies are forwarded up to (None: the full network, as the verdict reads their
        logits, or truncation is off). The originals always run in full: the prediction needs their logits."""
        if not self.use_truncation:
            return None
        layers = self.variant.copy_layers(list(self.backend.layers))
        return layers or None

    @property
    def schedule(self) -> Schedule | None:
        """The sequential test in use: the variant's, unless turned off or there are no noise copies to save."""
        s = self.variant.sequential
        return s if self.use_sequential and s and max_copies(self.variant) > 0 and self.calib else None

    @property
    def fused(self) -> bool:
        """Fixed-K verdicts run as one graph, rows and scoring included: one ONNX Runtime graph
        (backends/onnx_verdict.py), or on CUDA one torch function in a CUDA graph (backends/torch_verdict.py);
        with a calibrated variant of the nccr-v3 kind, unless turned off (`--no-fuse`)."""
        return self._fused_run() is not None

    def _fused_run(self) -> Callable[[np.ndarray], list[np.ndarray]] | None:
        """The fused verdict for the current variant and calibration, built on first use and rebuilt if either
        is replaced (the benches and the search swap variants on a loaded detector)."""
        if not self.use_fused or self.calib is None or self.schedule is not None:
            return None
        variant, calib, run = self._fused_for
        if variant is not self.variant or calib is not self.calib:
            run = self._build_fused()
            self._fused_for = (self.variant, self.calib, run)
        return run

    def verdict_spec(self, classes: int) -> VerdictGraph | None:
        """What a one-graph verdict of the current variant computes (None where it cannot express it)."""
        norm = (None, None) if self._identity else (self._mean, self._std)
        dims = len(self.manifest.input.shape)
        return verdict_graph(self.variant, self.calib, self.manifest.input.range, *norm, classes=classes, dims=dims)

    def _build_fused(self) -> Callable[[np.ndarray], list[np.ndarray]] | None:
        """Build the graph and check it against the numpy engine on a probe batch (seeded inputs across the value
        range): a model whose graph the fusion misreads (logits not its first output, other shapes) gets the
        numpy engine and a warning, never different verdicts."""
        if not getattr(self.backend, "fuses_verdicts", False) or self.calib is None:
            return None
        make = self.backend.fused_verdicts
        lo, hi = self.manifest.input.range
        shape = list(self.manifest.input.shape)
        probe = np.random.default_rng(0).uniform(lo, hi, (4, *shape)).astype(np.float32)
        acts = self.activations(probe)
        spec = self.verdict_spec(classes=acts["logits"].shape[-1])
        if spec is None:
            return None
        want = score_rows(self.variant, self.calib, acts)
        # The watched-layer session is idle from here on where the graph is used, so it goes before the graph's
        # session is built: the two never hold memory at once (bench/fused_memory.py's peak). Anything that
        # forwards rows later, the numpy engine after a fallback included, builds it again.
        if (release := getattr(self.backend, "release", None)) is not None:
            release()
        try:
            run = make(spec, shape)
            got = Scores(*run(probe))
        except Exception as e:  # noqa: BLE001 - any failure to build or run means: not fused
            log.warning("%s: verdict graph not used (%s); scoring in numpy", self.manifest.name, e)
            return None
        same = np.array_equal(got.prediction, want.prediction) and all(
            np.allclose(getattr(got, k), getattr(want, k), rtol=1e-5, atol=1e-7) for k in ("score", "raw", "confidence")
        )
        if not same:
            log.warning(
                "%s: verdict graph disagrees with the numpy engine on a probe; scoring in numpy", self.manifest.name
            )
            return None
        return run

    def rows(self, x: np.ndarray) -> np.ndarray:
        """(R, *shape) original + perturbed copies, seeded by (seed, input content): reproducible per input."""
        return self.batch_rows([x])[0]

    def batch_rows(self, xs: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """(B, R, *shape): `rows` of each input, built for the whole batch at once (one call per squeezer)."""
        xs = self._checked(xs)
        noisy = max_copies(self.variant) > 0
        rngs = [self.input_rng(x) for x in xs] if noisy else None
        return build_batch(xs, self.variant.perturbations, rngs, tuple(self.manifest.input.range))

    def input_rng(self, x: np.ndarray) -> np.random.Generator:
        """The generator of one input's random copies, seeded by (seed, its content): the same rows for an input
        whatever its batch-mates, fixed K or sequential."""
        return np.random.default_rng([self.seed, zlib.crc32(x.tobytes())])

    def _checked(self, xs: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """(B, *shape) float32 of `xs`, refused if an input's shape is not the model's."""
        xs = np.asarray(xs, np.float32)
        if list(xs.shape[1:]) != self.manifest.input.shape:
            raise ValueError(f"input shape {list(xs.shape[1:])} != model input {self.manifest.input.shape}")
        return xs

    def forward(self, rows: np.ndarray, upto: list[str] | None = None) -> dict[str, np.ndarray]:
        """Backend forward of stacked rows (n, *shape) -> layer -> (n, N); `upto`: truncated (no logits)."""
        if self._identity:
            return self.backend.forward(rows, upto)
        return self.backend.forward((rows - self._mean) / self._std, upto)

    def forward_rows(self, rows: np.ndarray, original: np.ndarray) -> dict[str, np.ndarray]:
        """Forward rows of which `original` (bool mask) are inputs themselves and the rest perturbed copies: the
        copies run only as far as the verdict reads them (`truncation`); what they skip comes back NaN."""
        upto = self.truncation
        if upto is None or original.all():
            return self.forward(rows)
        return merge_rows(self.forward(rows[original]), self.forward(rows[~original], upto), original)

    def activations(self, xs: list[np.ndarray] | np.ndarray, chunk: int = 0) -> dict[str, np.ndarray]:
        """layer -> (B, R, N) for a list of inputs, in forwards of at most `chunk` inputs (0 = one forward)."""
        xs = list(xs)
        chunk = chunk or len(xs)
        parts = []
        for i in range(0, len(xs), chunk):
            part = xs[i : i + chunk]
            if getattr(self.backend, "device_rows", False):  # GPU: rows built next to the model
                batch = np.stack([np.asarray(x, np.float32) for x in part])
                seed = zlib.crc32(batch.tobytes(), self.seed)
                parts.append(
                    self.backend.forward_perturbed(
                        batch,
                        self.variant.perturbations,
                        tuple(self.manifest.input.range),
                        seed,
                        self._mean,
                        self._std,
                        self.truncation,
                    )
                )
            else:
                rows = self.batch_rows(part).reshape(-1, *self.manifest.input.shape)
                parts.append(self.forward_rows(rows, np.arange(len(rows)) % self.rows_per_input == 0))
        r = self.rows_per_input
        whole = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return {k: v.reshape(len(xs), r, -1) for k, v in whole.items()}

    def verdicts(self, acts: dict[str, np.ndarray]) -> list[Verdict]:
        """Verdicts from layer -> (B, R, N) activations of fixed-K rows."""
        if self.calib is None:
            raise ManifestError(f"{self.manifest.name}: not calibrated")
        return self._fixed_k_verdicts(score_rows(self.variant, self.calib, acts))

    def _fixed_k_verdicts(self, s: Scores) -> list[Verdict]:
        """Every input's verdict from a batch's scores, each having used all of its fixed-K rows (the numpy
        engine's scores and the one-graph path's alike)."""
        assert self.calib is not None
        n = len(s.score)
        return self._verdicts(s, list(range(n)), [self.rows_per_input] * n)

    def _verdicts(self, s: Scores, which: list[int], passes: list[int]) -> list[Verdict]:
        """Verdicts of the inputs `which` of a scored batch. The columns become Python lists once per batch:
        indexing numpy arrays element by element cost a third of the engine's own time at 32 MNIST inputs."""
        assert self.calib is not None
        thr, names, labels = self.calib.threshold, self.variant.component_names, self.manifest.labels
        score, pred, conf = s.score.tolist(), s.prediction.tolist(), s.confidence.tolist()
        pv, raw = self.calib.p_values(score), s.raw.tolist()
        t_ood = self.calib.ood_threshold
        ood = (ood_spread(s.raw, self.calib) > t_ood).tolist() if t_ood < np.inf else [False] * len(score)
        return [
            Verdict(
                "adversarial" if score[i] > thr else "clean",
                score[i],
                thr,
                pv[i],
                k,
                labels[k] if 0 <= k < len(labels) else str(k),
                conf[i],
                n,
                raw[i],
                names,
                ood[i],
            )
            for i, n in zip(which, passes, strict=True)
            for k in (pred[i],)
        ]

    # Sequential testing: start a job per input, advance jobs (any mix of rounds) until each is done.
    def start(self, x: np.ndarray) -> Job:
        """A job whose rows are built round by round, in `advance` (the batch worker), not here (the event loop):
        the same rows as `rows(x)`, but only those its rounds forward."""
        x = self._checked([x])[0]
        return Job(LazyRows(x, self.variant.perturbations, lambda: self.input_rng(x), tuple(self.manifest.input.range)))

    def pending(self, job: Job) -> np.ndarray:
        """Indices of the rows `job`'s next round forwards."""
        assert self.schedule is not None
        plan = rounds(self.variant, self.schedule)
        now = layout(self.variant, plan[job.round])
        return now if job.round == 0 else np.setdiff1d(now, layout(self.variant, plan[job.round - 1]))

    def advance(self, jobs: list[Job]) -> list[bool]:
        """One forward of every job's next round, then settle each job whose verdict the bounds decide."""
        schedule = self.schedule
        if schedule is None or self.calib is None:
            raise ManifestError(f"{self.manifest.name}: sequential testing is off for this detector")
        idx = [self.pending(j) for j in jobs]
        out = self.forward_rows(
            np.concatenate([j.rows.take(i) for j, i in zip(jobs, idx, strict=True)]), np.concatenate(idx) == 0
        )
        start = 0
        for j, i in zip(jobs, idx, strict=True):
            for k, v in out.items():
                if k not in j.acts:
                    j.acts[k] = np.full((len(j.rows), v.shape[1]), np.nan, v.dtype)  # unforwarded: loud
                j.acts[k][i] = v[start : start + len(i)]
            start += len(i)
            j.forwarded += len(i)
        plan = rounds(self.variant, schedule)
        groups: dict[int, list[Job]] = {}
        for j in jobs:  # grouped before any job moves on a round, so none is scored twice in one call
            groups.setdefault(j.round, []).append(j)
        for r, group in sorted(groups.items()):
            rows = layout(self.variant, plan[r])
            acts = {k: np.stack([j.acts[k][rows] for j in group]) for k in out}
            s, lo, hi = bounded_scores(self.variant, self.calib, acts, plan[r], schedule.z)
            stop = settled(lo, hi, self.calib.threshold) | (r == len(plan) - 1)
            done = [n for n in range(len(group)) if stop[n]]
            passes = [group[n].forwarded for n in done]
            settled_now = self._verdicts(s, done, passes)
            for n, v in zip(done, settled_now, strict=True):
                group[n].verdict = v
            for n in range(len(group)):
                if not stop[n]:
                    group[n].round += 1
        return [j.done for j in jobs]

    def detect(self, xs: list[np.ndarray] | np.ndarray, chunk: int = 0) -> list[Verdict]:
        """Verdicts for a list of inputs: sequential where the detector tests sequentially, else all K rows."""
        if self.schedule is None:
            if (run := self._fused_run()) is not None:
                return self._fused_verdicts(run, xs, chunk)
            return self.verdicts(self.activations(xs, chunk))
        xs = list(xs)
        chunk = chunk or len(xs)
        out: list[Verdict] = []
        for i in range(0, len(xs), chunk):
            jobs = [self.start(x) for x in xs[i : i + chunk]]
            while live := [j for j in jobs if not j.done]:
                self.advance(live)
            out += [j.verdict for j in jobs if j.verdict]
        return out

    def _fused_verdicts(self, run: Callable[[np.ndarray], list[np.ndarray]], xs, chunk: int) -> list[Verdict]:
        """Verdicts of the one-graph path, in runs of at most `chunk` inputs (0: one run), as `verdicts` builds
        them from the numpy engine's scores."""
        xs = self._checked(xs)
        chunk = chunk or len(xs)
        outs = [run(xs[i : i + chunk]) for i in range(0, len(xs), chunk)]
        s = Scores(*outs[0]) if len(outs) == 1 else Scores(*(np.concatenate(a) for a in zip(*outs, strict=True)))
        return self._fixed_k_verdicts(s)
