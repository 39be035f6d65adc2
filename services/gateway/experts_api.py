"""``/v1/experts``: register, list, show and remove experts while the gateway serves (docs/api.md).

Handlers are module-level functions over ``app.state`` (the backend, the registry and the
authenticator that ``create_app`` puts there). Registering and removing take an admin key.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from registry.errors import MoergeError, NotFoundError
from registry.models import Expert
from services.gateway.auth import Principal, check_model_allowed, require_admin, require_user
from services.gateway.protocol import APIError, ExpertCard, ExpertCreateRequest, ExpertDeleted, ExpertDetail, ExpertList

log = logging.getLogger("moerge.gateway")

router = APIRouter(tags=["experts"])


@router.post("/v1/experts", response_model=ExpertCard, status_code=201)
async def register_expert(
    body: ExpertCreateRequest, request: Request, _: Principal = Depends(require_admin)
) -> JSONResponse:
    try:
        card = await request.app.state.backend.register_expert(body.registry_kwargs())
    except MoergeError as exc:  # RegistrationError, or NotFoundError for an unknown base
        raise APIError(400, str(exc), code="registration_refused") from exc
    log.info("registered expert %s version %s", card.get("name"), card.get("version"))
    return JSONResponse(ExpertCard(**card).model_dump(mode="json"), status_code=201)


@router.get("/v1/experts", response_model=ExpertList)
def list_experts(
    request: Request, kind: str | None = None, status: str | None = None, principal: Principal = Depends(require_user)
) -> ExpertList:
    experts = request.app.state.registry.list_experts(kind=kind, status=status)
    return ExpertList(data=[ExpertCard.from_record(e) for e in experts if principal.allows(e.name)])


@router.get("/v1/experts/{name}", response_model=ExpertDetail)
def get_expert(
    name: str, request: Request, version: str | None = None, principal: Principal = Depends(require_user)
) -> ExpertDetail:
    check_model_allowed(principal, name)
    registry = request.app.state.registry
    try:
        expert = registry.get_expert(name, version)
        n_examples = len(registry.get_examples(name, expert.version))
    except NotFoundError as exc:
        raise APIError(404, str(exc), type="not_found_error", code="expert_not_found", param="name") from exc
    with registry.reading() as s:
        versions = list(s.scalars(select(Expert.version).where(Expert.name == name).order_by(Expert.id)))
    card = ExpertCard.from_record(expert).model_dump()
    return ExpertDetail(**card, versions=versions, examples=n_examples)


@router.delete("/v1/experts/{name}", response_model=ExpertDeleted)
async def delete_expert(
    name: str, request: Request, version: str | None = None, _: Principal = Depends(require_admin)
) -> ExpertDeleted:
    try:
        removed = await request.app.state.backend.remove_expert(name, version)
    except NotFoundError as exc:
        raise APIError(404, str(exc), type="not_found_error", code="expert_not_found", param="name") from exc
    except MoergeError as exc:
        raise APIError(400, str(exc)) from exc
    log.info("removed expert %s (%d versions)", name, len(removed))
    return ExpertDeleted(name=name, versions=[ExpertCard(**c) for c in removed])
