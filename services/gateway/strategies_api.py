"""``/v1/strategies``: list, show, add and remove strategies defined as data (docs/strategies.md).

Handlers are module-level functions over ``app.state`` (the catalog and the authenticator that
``create_app`` puts there), as vLLM's api_server keeps its handlers outside the app factory.
Adding and removing take an admin key; a refused definition stores nothing (400, the message
names the valid choices).
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request

from registry.errors import DefinitionError, NotFoundError
from services.gateway.auth import Principal, check_model_allowed, require_admin, require_user
from services.gateway.protocol import APIError, StrategyCard, StrategyDefinition, StrategyDeleted, StrategyList
from services.moe.definitions import definition_of
from services.moe.strategies import Strategy

router = APIRouter(tags=["strategies"])


def card_of(strategy: Strategy) -> StrategyCard:
    return StrategyCard(**definition_of(strategy), level=strategy.level, source=strategy.source)


@router.get("/v1/strategies", response_model=StrategyList)
def list_strategies(request: Request, principal: Principal = Depends(require_user)) -> StrategyList:
    catalog = request.app.state.catalog
    return StrategyList(data=[card_of(s) for s in catalog.all().values() if principal.allows(s.name)])


@router.get("/v1/strategies/{name}", response_model=StrategyCard)
def get_strategy(name: str, request: Request, principal: Principal = Depends(require_user)) -> StrategyCard:
    try:
        strategy = request.app.state.catalog.get(name)
    except NotFoundError as exc:
        raise APIError(404, str(exc), type="not_found_error", code="strategy_not_found", param="name") from exc
    check_model_allowed(principal, strategy.name)
    return card_of(strategy)


@router.post("/v1/strategies", response_model=StrategyCard, status_code=201)
async def add_strategy(
    body: StrategyDefinition, request: Request, _: Principal = Depends(require_admin)
) -> StrategyCard:
    try:
        strategy = await anyio.to_thread.run_sync(request.app.state.catalog.add, body.model_dump())
    except DefinitionError as exc:
        raise APIError(400, str(exc), code="invalid_strategy") from exc
    return card_of(strategy)


@router.delete("/v1/strategies/{name}", response_model=StrategyDeleted)
async def remove_strategy(name: str, request: Request, _: Principal = Depends(require_admin)) -> StrategyDeleted:
    try:
        strategy = await anyio.to_thread.run_sync(request.app.state.catalog.remove, name)
    except NotFoundError as exc:
        raise APIError(404, str(exc), type="not_found_error", code="strategy_not_found", param="name") from exc
    except DefinitionError as exc:
        raise APIError(400, str(exc), code="strategy_not_removable") from exc
    return StrategyDeleted(name=strategy.name)
