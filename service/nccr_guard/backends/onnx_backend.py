"""ONNX Runtime backend. Watched layers must be graph outputs: tensors named in `watch` that are not are
added to `graph.output` before the session is built, so any exported classifier can be watched."""

from __future__ import annotations

import numpy as np

from nccr_guard.backends import BackendError, reduce_tap
from nccr_guard.manifest import Manifest


def _with_outputs(path: str, names: list[str]) -> bytes:
    import onnx

    model = onnx.load(path)
    have = {o.name for o in model.graph.output}
    known = {n for node in model.graph.node for n in node.output}
    for name in names:
        if name in have:
            continue
        if name not in known:
            raise BackendError(f"{path}: no tensor named {name!r} to watch")
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString()


class OnnxBackend:
    name = "onnx"
    supports_gradients = False

    def __init__(self, manifest: Manifest, device: str = "auto", threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install 'nccr-guard[cpu]' (or [gpu])") from None
        if not manifest.weights.onnx:
            raise BackendError(f"{manifest.name}: no onnx weights in model.toml")
        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise BackendError(f"device cuda asked for, but ONNX Runtime offers only {available}")
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.layers = list(manifest.watch)
        model_bytes = _with_outputs(str(manifest.path(manifest.weights.onnx)), self.layers)
        self.session = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_names = [outputs[0], *self.layers]

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return {"logits": outs[0], **{n: reduce_tap(a) for n, a in zip(self.layers, outs[1:], strict=True)}}
