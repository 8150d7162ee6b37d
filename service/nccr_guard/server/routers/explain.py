"""POST /v1/explain (a verdict and what it is made of, for the page) and POST /v1/attack (the opt-in demo
attack: a clean / adversarial pair). Thin: the work is nccr_guard.explain's, the verdicts the batcher's."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from nccr_guard.explain import DemoAttack, data_uri, explain, png_bytes
from nccr_guard.inputs import InputError, decode
from nccr_guard.server.deps import Authorized, ServiceDep, deadline
from nccr_guard.server.routers.detect import (
    ERRORS,
    UPLOAD_BODY,
    detect_upload,
    detection,
    refuse_if_full,
    wait_unless_gone,
)
from nccr_guard.server.schemas import Attacked, AttackInfo, Error, Explained, Explanation
from nccr_guard.server.state import Service
from nccr_guard.server.uploads import Upload, read_uploads

router = APIRouter(prefix="/v1", tags=["explain"], dependencies=[Authorized])


async def one_upload(request: Request, service: Service) -> tuple[Upload, str | None]:
    refuse_if_full(request, service)
    uploads, fields = await read_uploads(request, service.settings.max_upload_bytes, deadline(request))
    if len(uploads) != 1:
        raise InputError(f"send exactly one file here ({len(uploads)} given)")
    return uploads[0], fields.get("model")


EXPLAIN_ERRORS = {**ERRORS, 404: {"model": Error, "description": "explanations are off, or an unknown model"}}


@router.post("/explain", response_model=Explained, responses=EXPLAIN_ERRORS, openapi_extra=UPLOAD_BODY)
async def explain_upload(request: Request, service: ServiceDep) -> Explained:
    """Score one upload as POST /v1/detect does (`detection`, the same answer) and show what the score is made
    of (`explanation`): each component's z-score and contribution, the clean calibration score distribution,
    and for images thumbnails of the perturbed copies. Costs the verdict's rows a second time."""
    if not service.settings.explain:
        raise InputError("explanations are off on this server (--no-explain); POST /v1/detect scores", 404, "not_found")
    up, model = await one_upload(request, service)
    det = await detect_upload(request, service, up, model)
    rt = service.runtimes[det.model]
    d = rt.detector

    def work() -> dict:
        return explain(d, decode(up.data, d.manifest, service.limits), service.settings.score_decimals)

    found = await wait_unless_gone(request, run_in_threadpool(work), deadline(request))
    return Explained(detection=det, explanation=Explanation.model_validate(found))


def demo_attack(service: Service, name: str) -> DemoAttack:
    """The model's demo attacker, made on first use (its torch module and ART classifier are loaded then)."""
    if name not in service.demo_attacks:
        service.demo_attacks[name] = DemoAttack.of(service.runtimes[name].detector)
    return service.demo_attacks[name]


ATTACK_ERRORS = {**ERRORS, 404: {"model": Error, "description": "the attack demo is off, or an unknown model"}}


@router.post("/attack", response_model=Attacked, responses=ATTACK_ERRORS, openapi_extra=UPLOAD_BODY)
async def attack(request: Request, service: ServiceDep) -> Attacked:
    """With `--attack-demo`: attack one uploaded image on the server (ART PGD, a few steps) and score both the
    upload and the adversarial image (as the 8-bit PNG returned). Off: 404."""
    s = service.settings
    if not s.attack_demo:
        raise InputError(
            "the attack demo is off on this server: start it with --attack-demo (NCCR_GUARD_ATTACK_DEMO=true)",
            404,
            "not_found",
        )
    start = time.monotonic()
    up, model = await one_upload(request, service)
    rt = service.runtime(model, up.data)
    if (why := DemoAttack.supported(rt.detector)) is not None:
        raise InputError(why, 400)
    attacker, m, due = demo_attack(service, rt.name), rt.detector.manifest, deadline(request)

    def work():
        x = decode(up.data, m, service.limits)
        adv, info = attacker.run(x, s.seed)
        png = png_bytes(adv, tuple(m.input.range))  # what the visitor gets is what is scored: 8-bit pixels
        return x, decode(png, m, service.limits), data_uri(png), info

    request.scope["state"]["model"] = rt.name
    x, adv, image, info = await wait_unless_gone(request, run_in_threadpool(work), due)
    with rt.admit(2) as held:
        [(clean, t)] = await wait_unless_gone(request, rt.detect_part(x[None], held), due)
        [(attacked, t_adv)] = await wait_unless_gone(request, rt.detect_part(adv[None], held), due)
    d = s.score_decimals
    request.scope["state"]["verdict"] = attacked.verdict
    return Attacked(
        clean=detection(rt, clean, t, start, d),
        adversarial=detection(rt, attacked, t_adv, start, d),
        image=image,
        attack=AttackInfo.model_validate(info),
    )
