"""The OpenAPI 3.1 document of every route, built from the router so it cannot drift."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from imaging_gateway import __version__

_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")
_PUBLIC = frozenset({"/healthz", "/openapi.json"})


def build_openapi(app: web.Application) -> dict[str, Any]:
    """One operation per (path, method) of ``app``'s router, described by its handler."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        method = route.method.lower()
        if method in ("head", "options", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        raw = info.get("path") or info.get("formatter")
        if not raw:
            continue
        path = _PARAM.sub(r"{\1}", raw)
        doc = (route.handler.__doc__ or route.handler.__name__).strip()
        operation: dict[str, Any] = {
            "operationId": f"{route.handler.__name__}_{method}_{len(paths)}",
            "summary": doc.splitlines()[0],
            "tags": [_tag(path)],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _PARAM.findall(raw)
            ] + _QUERY.get((path, method), []),
            "responses": _responses(path, route.handler.__name__),
        }
        if path in _PUBLIC:
            operation["security"] = []
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imaging-gateway",
            "version": __version__,
            "description": (
                "A province's DICOM imaging gateway: DICOMweb (PS3.18) search and retrieve "
                "behind patient authorization, consent grants, administration."
            ),
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


_LIMIT = {"type": "integer", "minimum": 1, "maximum": 1000}
# Query parameters of the admin listings (the DICOMweb ones are those of PS3.18).
_QUERY: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("/admin/sync-jobs", "get"): [
        _query("store", "only this store's jobs", {"type": "string"}),
        _query("limit", "at most this many (default 50)", _LIMIT),
    ],
    ("/admin/quarantine", "get"): [
        _query("store", "only this store's objects", {"type": "string"}),
        _query("limit", "page size (default 100)", _LIMIT),
        _query("cursor", "the previous page's `next`", {"type": "string"}),
    ],
}


def _tag(path: str) -> str:
    if path.startswith("/dicomweb"):
        return "DICOMweb"
    if path.startswith("/admin"):
        return "admin"
    if path.startswith(("/consents", "/me")):
        return "consent"
    return "service"


# QIDO-RS and Retrieve Metadata answer DICOM JSON by default, or PS3.19 Native DICOM
# Model XML, one part per result or instance (PS3.18 8.7.3, 10.4.1.1.2, 10.6.3.3).
_DICOM_CONTENT = {
    "application/dicom+json": {"schema": {"type": "array", "items": {"type": "object"}}},
    'multipart/related; type="application/dicom+xml"': {
        "schema": {"type": "string", "format": "binary"}
    },
}


def _dicom_content(handler: str) -> bool:
    if handler.startswith("search_for_"):
        return True
    return handler.startswith("retrieve_") and handler.endswith("_metadata")


def _responses(path: str, handler: str = "") -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK"}}
    if path.startswith("/dicomweb") and _dicom_content(handler):
        responses["200"]["content"] = _DICOM_CONTENT
        responses["204"] = {"description": "no match (search)"}
    if path not in _PUBLIC:
        responses["401"] = {"description": "no valid bearer token"}
        responses["403"] = {"description": "the token's role may not do this"}
    if path.startswith("/dicomweb"):
        responses["404"] = {"description": "no such study, or one the caller may not see"}
        responses["406"] = {"description": "no acceptable representation"}
    return responses


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document of this gateway (public, like /healthz)."""
    return web.json_response(build_openapi(request.app))
