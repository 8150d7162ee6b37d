"""Response and request bodies (what /docs shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    index: int
    label: str
    confidence: float


class TimingsMs(BaseModel):
    queue: float
    compute: float
    total: float


class Detection(BaseModel):
    model: str
    modality: str
    verdict: str = Field(description="clean | adversarial")
    score: float = Field(description="combined standardised NCCR; above `threshold` means adversarial")
    threshold: float
    p_value: float = Field(description="share of clean calibration inputs scoring at least as high")
    ood: bool = Field(
        False,
        description="the input's instability profile is unlike the clean calibration data's (blank, noise, not the "
        "kind of input the model was built for): the prediction and the verdict are unreliable",
    )
    prediction: Prediction
    passes: int = Field(description="forward passes (rows) spent on this input")
    timings_ms: TimingsMs


class BatchItem(BaseModel):
    filename: str | None = None
    result: Detection | None = None
    error: str | None = None
    status: int = 200


class BatchDetection(BaseModel):
    results: list[BatchItem]


class Error(BaseModel):
    error: str


class ModelCard(BaseModel):
    name: str
    modality: str
    labels: list[str]
    input: dict
    backend: str
    device: str
    variant: str
    components: list[str]
    k: int
    passes: int = Field(description="rows of a fixed-K verdict: the most a sequential verdict forwards")
    sequential: dict | None = Field(
        None,
        description="sequential-testing schedule in use (first, step, z, first_by, and its label as "
        "--sequential-schedule takes it), null when off",
    )
    truncated_to: list[str] | None = Field(None, description="layers perturbed copies run up to; null: full network")
    cuda_graphs: bool = Field(False, description="forwards replay captured CUDA graphs (torch backend on CUDA)")
    fused: bool = Field(
        False,
        description="verdicts run as one graph, rows, forward and scoring: ONNX Runtime's, or a torch function "
        "replayed from a CUDA graph (--no-fuse: off)",
    )
    calibration: dict
    robustness_nccr: float = Field(
        description="model-level NCCR over the clean calibration data (lower = more stable; docs/nccr.md says how "
        "far it ranks models by robustness)"
    )
    robustness_measure: str = Field(description="the component robustness_nccr averages")
    ready: bool
    explain: bool = Field(True, description="POST /v1/explain is served (--no-explain: off)")
    attack_demo: bool = Field(
        False, description="POST /v1/attack serves this model (--attack-demo, image models with torch weights)"
    )


class Thumbnail(BaseModel):
    row: int = Field(description="the row's index among the verdict's rows (0: the input itself)")
    perturbation: str = Field(description="its perturbation's key, e.g. bitdepth:1 or gaussian:0.1; original")
    what: str
    prediction: str | None = Field(description="the model's label for this row (null where its logits are not run)")
    image: str = Field(description="the row as an 8-bit PNG data URI")


class Contribution(BaseModel):
    name: str
    z: float = Field(description="the component's standardised reading (z-score of its log against clean data)")
    weight: float | None = Field(None, description="its weight in a logistic combiner")
    contribution: float = Field(description="what it adds to the score: weight x z (logistic), z (max)")
    max: bool = Field(False, description="the component whose z-score is the score (max combiner)")


class Combiner(BaseModel):
    kind: str = Field(description="max | logistic")
    components: list[Contribution] = Field(
        description="max: every component, largest first; logistic: the largest |weight x z| terms"
    )
    bias: float = Field(description="the logistic combiner's bias (0 for max)")
    rest: float = Field(description="the sum of the logistic terms not listed (0 for max)")
    n_components: int


class CleanHistogram(BaseModel):
    edges: list[float]
    counts: list[int]
    n: int = Field(description="clean calibration inputs")


class Explanation(BaseModel):
    score: float = Field(description="the fixed-K score these readings give (a sequential verdict may stop earlier)")
    threshold: float
    rows: int = Field(description="rows of the fixed-K verdict")
    rows_as_verdict: bool = Field(
        True,
        description="these are the verdict's own rows (false on a CUDA torch backend, which draws a verdict's noise "
        "copies on the device, seeded by its batch: the squeezes are the same, the noise draws are others)",
    )
    combiner: Combiner
    clean: CleanHistogram = Field(description="the clean calibration scores the threshold was set on")
    thumbnails: list[Thumbnail] = Field(description="images: the original, each squeeze, one copy per noise family")


class Explained(BaseModel):
    detection: Detection
    explanation: Explanation


class AttackInfo(BaseModel):
    name: str
    norm: str
    eps: float
    eps_step: float
    max_iter: int
    l_inf: float = Field(description="the largest change of one value, in the model's input range")


class Attacked(BaseModel):
    clean: Detection
    adversarial: Detection
    image: str = Field(description="the adversarial image as an 8-bit PNG data URI (what was scored)")
    attack: AttackInfo


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class V2InputTensor(BaseModel):
    """An input tensor: values in `data`, or (binary tensor data extension) `parameters.binary_data_size` bytes
    after the JSON header of the body."""

    name: str
    shape: list[int]
    datatype: str
    data: list | None = None
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    inputs: list[V2InputTensor]
    outputs: list[dict] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2Tensor]
