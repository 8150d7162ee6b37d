"""GET /v1/models and /v1/models/{name}: what is served, how, and how it was calibrated."""

from __future__ import annotations

from fastapi import APIRouter

from nccr_guard.config import Settings
from nccr_guard.explain import DemoAttack
from nccr_guard.inputs import InputError
from nccr_guard.server.deps import Authorized, ServiceDep
from nccr_guard.server.runtime import ModelRuntime
from nccr_guard.server.schemas import Error, ModelCard

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Authorized])


def card(rt: ModelRuntime, settings: Settings | None = None) -> ModelCard:
    """`settings`: the server's, which say whether POST /v1/explain and /v1/attack are served."""
    explain, attack_demo = (settings.explain, settings.attack_demo) if settings else (True, False)
    det, c = rt.detector, rt.detector.calib
    m = det.manifest
    return ModelCard(
        name=m.name,
        modality=m.modality,
        labels=m.labels,
        input=m.input.model_dump(mode="json"),
        backend=det.backend.name,
        device=det.backend.device,
        variant=det.variant.name,
        components=[comp.name for comp in det.variant.components],
        k=max(p.copies for p in det.variant.perturbations),
        passes=det.rows_per_input,
        sequential={**det.schedule.__dict__, "label": det.schedule.label} if det.schedule else None,
        truncated_to=det.truncation,
        cuda_graphs=det.backend.cuda_graphs,
        fused=det.fused,
        calibration={
            "target_fpr": c.target_fpr,
            "threshold": c.threshold,
            "n_clean": c.meta.get("n_clean"),
            "data": c.meta.get("data"),
            "batching": rt.policy.__dict__,
        },
        robustness_nccr=c.robustness,
        robustness_measure=det.variant.robustness.name,
        ready=rt.ready,
        explain=explain,
        attack_demo=attack_demo and DemoAttack.supported(det) is None,
    )


@router.get("", response_model=list[ModelCard])
async def list_models(service: ServiceDep) -> list[ModelCard]:
    return [card(rt, service.settings) for rt in service.runtimes.values()]


@router.get("/{name}", response_model=ModelCard, responses={404: {"model": Error}})
async def get_model(name: str, service: ServiceDep) -> ModelCard:
    if name not in service.runtimes:
        raise InputError(f"no model named {name!r}", 404, "not_found")
    return card(service.runtimes[name], service.settings)
