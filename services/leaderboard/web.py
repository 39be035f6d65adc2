"""The leaderboard over HTTP: ``GET /leaderboard`` (the HTML report as a page) and
``GET /v1/leaderboard`` (the same board as JSON), plus ``GET /v1/leaderboard/runs``.

``leaderboard_router(registry)`` is a FastAPI ``APIRouter``; the gateway mounts it with one
``include_router``. The endpoints are read-only and need no API key: they show benchmark results
only (no prompts, answers or keys), like ``/healthz``. ``?run=<id>`` picks a run, ``?suite=<name>``
the newest run of a suite; the default is the newest run.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse

from registry.errors import NotFoundError
from registry.service import Registry
from services.leaderboard.board import build_board
from services.leaderboard.report import render
from services.leaderboard.store import run_dict


def leaderboard_router(registry: Registry) -> APIRouter:
    router = APIRouter(tags=["leaderboard"])

    @router.get("/leaderboard", response_class=HTMLResponse, summary="The leaderboard as a page")
    def page(
        run: int | None = Query(None, description="run id (default: the newest)"),
        suite: str | None = Query(None, description="newest run of this suite"),
    ) -> HTMLResponse:
        try:
            board = build_board(registry, run, suite)
        except NotFoundError as exc:
            return HTMLResponse(
                f"<!doctype html><meta charset=utf-8><title>moerge leaderboard</title><h1>moerge leaderboard</h1>"
                f"<p>{escape(str(exc))}</p>",
                status_code=404,
            )
        return HTMLResponse(render(board))

    @router.get("/v1/leaderboard", summary="The leaderboard as JSON")
    def data(
        run: int | None = Query(None, description="run id (default: the newest)"),
        suite: str | None = Query(None, description="newest run of this suite"),
    ) -> JSONResponse:
        try:
            board = build_board(registry, run, suite)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        return JSONResponse(board.to_dict())

    @router.get("/v1/leaderboard/runs", summary="Stored leaderboard runs, newest first")
    def runs(suite: str | None = None, limit: int = Query(50, ge=1, le=1000)) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [run_dict(r) for r in registry.list_leaderboard_runs(suite, limit)]}
        )

    return router
