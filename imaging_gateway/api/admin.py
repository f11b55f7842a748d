"""Admin routes: sync jobs, index statistics and quarantine (role ``admin``)."""

from __future__ import annotations

import base64
import binascii
import json

from aiohttp import web

from imaging_gateway.api.keys import ADMIN, PRINCIPAL
from imaging_gateway.api.params import int_param, json_body
from imaging_gateway.api.urls import public_base
from imaging_gateway.errors import InvalidRequest
from imaging_gateway.security.principals import Principal

routes = web.RouteTableDef()


def _admin(request: web.Request) -> Principal:
    principal: Principal = request[PRINCIPAL]
    principal.require("admin")
    return principal


@routes.post("/admin/sync-jobs")
async def create_sync_job(request: web.Request) -> web.Response:
    """Start a sync job: ``{"store": NAME, "mode": "incremental"|"full", "restart": false}``."""
    _admin(request)
    base = public_base(request)  # a bad Host is refused before the job starts
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("store"), str):
        raise InvalidRequest('body must be {"store": NAME, "mode": "incremental"|"full"}')
    mode = body.get("mode", "incremental")
    if mode not in ("incremental", "full"):
        raise InvalidRequest("mode must be incremental or full")
    restart = body.get("restart", False)
    if not isinstance(restart, bool):
        raise InvalidRequest("restart must be true or false")
    job = await request.app[ADMIN].start_sync(body["store"], mode=mode, restart=restart)
    return web.json_response(
        job, status=202, headers={"Location": f"{base}/admin/sync-jobs/{job['id']}"}
    )


@routes.get("/admin/sync-jobs")
async def list_sync_jobs(request: web.Request) -> web.Response:
    _admin(request)
    store = request.query.get("store")
    limit = int_param(request.query, "limit", default=50, minimum=1, maximum=1000)
    return web.json_response(await request.app[ADMIN].list_jobs(store=store, limit=limit))


@routes.get("/admin/sync-jobs/{job_id}")
async def get_sync_job(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response(await request.app[ADMIN].get_job(request.match_info["job_id"]))


@routes.get("/admin/index/stats")
async def index_stats(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response(await request.app[ADMIN].stats())


def _encode_cursor(store: str, key: str) -> str:
    raw = json.dumps([store, key], ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(text: str) -> tuple[str, str]:
    """The (store, key) a ``next`` cursor stands for; ``InvalidRequest`` naming it if not."""
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        value = None
    if not (
        isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
    ):
        raise InvalidRequest("cursor must be the 'next' value of a previous page")
    return value[0], value[1]


@routes.get("/admin/quarantine")
async def list_quarantine(request: web.Request) -> web.Response:
    """Quarantined objects and why, by store and key: ``?store=&limit=&cursor=``.

    Answers ``{"items": [...], "next": cursor or null}``; pass ``next`` as ``cursor`` for
    the following page (keyset paging: stable while syncs add or remove entries).
    """
    _admin(request)
    limit = int_param(request.query, "limit", default=100, minimum=1, maximum=1000)
    cursor = request.query.get("cursor")
    after = None if cursor is None else _decode_cursor(cursor)
    items, last = await request.app[ADMIN].quarantine(
        store=request.query.get("store"), after=after, limit=limit
    )
    return web.json_response(
        {"items": items, "next": _encode_cursor(*last) if last is not None else None}
    )
