"""`nccr-guard layers`: the layers of a model that `watch` in model.toml can name, with their shapes.

For the ONNX backend a layer is a tensor of the graph (ONNX Runtime's backend adds a watched tensor to the graph's
outputs); for torch, a module of the network (a forward hook reads its output). The names differ between the two:
torch.onnx.export's default exporter names tensors after the operation that makes them (`relu_2`, `linear`), not
after the module (`fc1`), unless the module's output is a graph output of that name (nccr_guard.export does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nccr_guard.manifest import Manifest


@dataclass(frozen=True)
class Layer:
    name: str
    op: str  # the ONNX operator or the torch module class
    shape: list[int | str]  # with the batch axis first; a symbolic axis by its name
    neurons: int | None  # what NCCR reads of it: channels of a conv map or a sequence, else the flattened size
    watched: bool


def neurons(shape: list[int | str]) -> int | None:
    """Values per input once reduced as the backends reduce a watched layer (backends.reduce_tap): a conv map
    (B, C, H, W) or a sequence (B, T, H) gives one per channel, anything else its flattened size."""
    rest = shape[1:]
    if len(shape) == 4:
        rest = [shape[1]]
    elif len(shape) == 3:
        rest = [shape[2]]
    return math.prod(rest) if rest and all(isinstance(d, int) for d in rest) else None


def onnx_layers(m: Manifest) -> list[Layer]:
    """Every float tensor an operator of the ONNX graph computes with a batch axis and at least one more, in graph
    order, with the shape ONNX's shape inference gives it (the logits first among the graph outputs)."""
    import onnx

    model = onnx.load(str(m.path(m.weights.onnx)), load_external_data=False)  # shapes need no weights
    graph = onnx.shape_inference.infer_shapes(model).graph
    info = {v.name: v.type.tensor_type for v in (*graph.value_info, *graph.output)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    out = []
    for node in graph.node:
        for name in node.output:
            t = info.get(name)
            if t is None or t.elem_type not in floats or len(dims := t.shape.dim) < 2:
                continue
            shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
            out.append(Layer(name, node.op_type, shape, neurons(shape), name in m.watch))
    return out


def torch_layers(m: Manifest) -> list[Layer]:
    """Every module of the network whose output is a tensor with a batch axis, in the order a forward of two
    zero inputs reaches them."""
    import torch

    from nccr_guard.backends.torch_backend import load_module

    module, seen = load_module(m), {}

    def hook(name: str):
        def record(mod: torch.nn.Module, _inp: object, output: object) -> None:
            t = output[0] if isinstance(output, tuple) and output else output
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and name not in seen:
                seen[name] = (type(mod).__name__, list(t.shape))

        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in module.named_modules() if name]
    try:
        with torch.no_grad():
            module(torch.zeros(2, *m.input.shape))
    finally:
        for h in handles:
            h.remove()
    return [
        Layer(name, op, ["batch", *shape[1:]], neurons(shape), name in m.watch) for name, (op, shape) in seen.items()
    ]


def candidate_layers(m: Manifest, backend: str = "auto") -> tuple[str, list[Layer]]:
    """(the backend whose names these are, its layers). `auto`: ONNX where model.toml names an ONNX file."""
    from nccr_guard.backends import BackendError, has_weights

    if backend == "auto":
        backend = "onnx" if has_weights(m, "onnx") else "torch"
    if not has_weights(m, backend):
        raise BackendError(f"{m.name}: no {backend} weights in model.toml")
    return backend, onnx_layers(m) if backend == "onnx" else torch_layers(m)
