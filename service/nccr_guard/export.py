"""ONNX export of a torch model with its watched layers as extra graph outputs."""

from __future__ import annotations

from pathlib import Path

import torch

from nccr_guard.backends.torch_backend import Tapped


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, ...], layers: list[str]) -> None:
    """Write `path` with outputs ("logits", *layers) and a dynamic batch axis. The wrapper is put in eval mode
    too: the exporter restores the wrapper's mode afterwards, recursively, and a new module's is training, which
    would leave `model`'s batch norms in training mode."""
    tapped = Tapped(model.eval(), layers).eval()
    dummy = torch.zeros(2, *input_shape)
    names = ["logits", *layers]
    torch.onnx.export(
        tapped,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=names,
        dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
        opset_version=17,
        dynamo=False,
    )
