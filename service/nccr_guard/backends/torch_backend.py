"""PyTorch eager backend: forward hooks read the watched layers in the same pass as the logits."""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from nccr_guard.backends import BackendError, merge_rows
from nccr_guard.backends.graphs import GraphedForward, cuda_capture
from nccr_guard.backends.onnx_verdict import VerdictGraph
from nccr_guard.manifest import Manifest


def load_module(manifest: Manifest) -> nn.Module:
    """The model as a torch module in eval mode, from TorchScript or module path + state dict."""
    w = manifest.weights
    if w.torchscript:
        return torch.jit.load(str(manifest.path(w.torchscript)), map_location="cpu").eval()
    if not (w.torch_module and w.state_dict):
        raise BackendError(f"{manifest.name}: torch backend needs torchscript or torch_module + state_dict")
    mod_name, _, cls_name = w.torch_module.partition(":")
    module = getattr(importlib.import_module(mod_name), cls_name)()
    state = torch.load(manifest.path(w.state_dict), map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return module.eval()


class _Truncated(Exception):
    """Raised by the last hook a truncated forward needs: the rest of the network is not run."""


class Tapped(nn.Module):
    """Wraps a model so that forward returns (logits, *watched layer outputs): the shape ONNX export keeps.

    Hooks write to thread-local storage: the batcher runs forwards from several threads at once. `truncated`
    stops the forward as soon as the layers it asks for have run, whatever the model's structure."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.model, self.layers = model, list(layers)
        self._local = threading.local()
        modules = dict(model.named_modules())
        missing = [name for name in self.layers if name not in modules]
        if missing:
            raise BackendError(f"watched layers not in the model: {missing}; have {sorted(modules)[:20]}...")
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
            store = getattr(self._local, "out", None)  # None: another wrapper of the same module is running
            if store is not None:
                store[name] = out[0] if isinstance(out, tuple) else out
                stop = getattr(self._local, "stop", None)
                if stop is not None and stop <= store.keys():
                    raise _Truncated

        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._local.out, self._local.stop = (out := {}), None
        logits = self.model(x)
        return (logits, *(out[name] for name in self.layers))

    def truncated(self, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, ...]:
        """The watched `layers` only, running the model no further than the last of them."""
        self._local.out, self._local.stop = (out := {}), set(layers)
        try:
            self.model(x)
        except _Truncated:
            pass
        finally:
            self._local.stop = None
        return tuple(out[name] for name in layers)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Same reduction as `reduce_tap`, on the device, so only (B, channels) crosses to the host."""
    if t.ndim == 4:
        return t.mean((2, 3))
    if t.ndim == 3:
        return t.mean(1)
    return t.flatten(1)


class TorchBackend:
    name = "torch"
    supports_gradients = True

    def __init__(
        self,
        manifest: Manifest,
        device: str = "auto",
        threads: int = 0,
        half: bool = False,
        cuda_graphs: bool = True,
        graph_max_rows: int = 256,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.manifest = manifest
        self.torch_device = pick_device(device)
        self.device = str(self.torch_device)
        self.layers = list(manifest.watch)
        self.module = load_module(manifest).to(self.torch_device)
        self.half = half and self.torch_device.type == "cuda"
        self.tapped = Tapped(self.module, self.layers)
        if self.half:
            self.tapped.half()
        # On CUDA the rows are built on the device (backends/torch_rows.py); on the CPU numpy is as fast.
        self.device_rows = self.torch_device.type == "cuda"
        if self.device_rows:
            torch.backends.cudnn.benchmark = True
        self.graphs: GraphedForward | None = None
        # Whether Detector runs fixed-K verdicts through `fused_verdicts`: on CUDA, where a graph captures rows,
        # forward and scoring as one replay. On the CPU torch's per-operator cost made it no faster than the numpy
        # engine (bench.engine's fused_ratio: behind at one MNIST input in two runs of three), so it stays off there.
        self.fuses_verdicts = self.torch_device.type == "cuda"
        if cuda_graphs and self.torch_device.type == "cuda":
            tol = (1e-2, 1e-2) if self.half else (1e-3, 1e-4)
            capture = cuda_capture(torch.cuda.graph_pool_handle())
            self.graphs = GraphedForward(capture, graph_max_rows, rtol=tol[0], atol=tol[1], sync=torch.cuda.synchronize)

    @property
    def cuda_graphs(self) -> bool:
        """Whether forwards replay CUDA graphs (off on the CPU, by flag, or after a failed capture check)."""
        return bool(self.graphs and self.graphs.active)

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        """`x` as float32 on the backend's device (on the CPU, the array's own memory). A reused page-locked staging
        buffer measured within noise on a GPU (docs/decisions/014-pinned-uploads.md), so torch's copy does it."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t.to(self.torch_device, non_blocking=True)

    def _compute(self, t: torch.Tensor, upto: list[str] | None) -> tuple[torch.Tensor, ...]:
        """The device tensors `_run` returns, in its order: what a CUDA graph captures."""
        t = t.half() if self.half else t
        if upto is not None:
            return tuple(reduce_tensor(o) for o in self.tapped.truncated(t, upto))
        outs = self.tapped(t)
        return (outs[0], *(reduce_tensor(o) for o in outs[1:]))

    def _run(self, t: torch.Tensor, upto: list[str] | None = None) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            fn = functools.partial(self._compute, upto=upto)
            outs = self.graphs(fn, t, upto or ()) if self.graphs else None
            if outs is None:
                outs = fn(t)
            arrays = [o.float().cpu().numpy() for o in outs]
        return dict(zip(upto if upto is not None else ["logits", *self.layers], arrays, strict=True))

    def forward(self, x: np.ndarray, upto: list[str] | None = None) -> dict[str, np.ndarray]:
        return self._run(self._to_device(x), upto)

    def fused_verdicts(self, spec: VerdictGraph, shape: list[int]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """The whole verdict as one function on the device (backends/torch_verdict.py), replayed from a CUDA
        graph where graphs are on and its rows fit `graph_max_rows`: inputs (B, *shape) in, engine.Scores' four
        arrays out, after one device-to-host copy."""
        from nccr_guard.backends.torch_verdict import split, verdict_fn

        def logits(rows: torch.Tensor) -> torch.Tensor:
            return self.tapped(rows.half() if self.half else rows)[0]

        fn = verdict_fn(spec, logits, self.torch_device)

        def run(xs: np.ndarray) -> list[np.ndarray]:
            # A batch whose rows exceed the largest graph replays in graph-sized chunks rather than eagerly: on
            # the H200 eager verdicts of 128 MNIST inputs took 2.0 ms against 0.44 ms per graphed 32.
            per = self.graphs.sizes[-1] // spec.rows if self.graphs is not None else 0
            with torch.inference_mode():
                x = self._to_device(xs)
                if per == 0:
                    out = fn(x)[0]
                else:
                    parts = [x[i : i + per] for i in range(0, len(x), per)]
                    outs = [(self.graphs(fn, p, ("verdict",)) or fn(p))[0] for p in parts]
                    out = outs[0] if len(outs) == 1 else torch.cat(outs)
                return split(out.cpu().numpy())

        return run

    def forward_perturbed(
        self,
        xs: np.ndarray,
        perturbations: tuple,
        value_range: tuple[float, float],
        seed: int,
        mean: np.ndarray,
        std: np.ndarray,
        upto: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Build every input's rows on the device and run them: xs (B, *shape) -> layer -> (B * R, N).
        With `upto`, the copies run truncated (see Detector.forward_rows)."""
        from nccr_guard.backends.torch_rows import build_rows

        gen = torch.Generator(device=self.torch_device).manual_seed(seed)
        with torch.inference_mode():
            x = self._to_device(xs)
            rows = build_rows(x, perturbations, gen, value_range)
            m, s = (torch.as_tensor(a, device=self.torch_device) for a in (mean, std))
            rows = (rows - m) / s
            if upto is None:
                return self._run(rows.reshape(-1, *xs.shape[1:]))
            b, r = rows.shape[:2]
            full = self._run(rows[:, 0])
            part = self._run(rows[:, 1:].reshape(-1, *xs.shape[1:]), upto)
        return merge_rows(full, part, np.arange(b * r) % r == 0)
