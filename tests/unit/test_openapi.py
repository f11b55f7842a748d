"""The OpenAPI document lists every route of the app, with the right security."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from imaging_gateway.api.cors import setup_cors
from imaging_gateway.api.openapi import build_openapi
from imaging_gateway.app import create_app
from imaging_gateway.settings import load_settings


def app(tmp_path: Path) -> web.Application:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nprovince = "110000"\n[index]\nurl = "sqlite:///x.db"\n',
                   encoding="utf-8")
    return create_app(load_settings(cfg, environ={}))


def test_every_route_is_documented(tmp_path: Path) -> None:
    application = app(tmp_path)
    doc = build_openapi(application)
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    for route in application.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        info = route.resource.get_info()  # type: ignore[union-attr]
        raw = info.get("path") or info.get("formatter")
        path = raw.replace("{study:[0-9.]+}", "{study}").replace(
            "{series:[0-9.]+}", "{series}").replace("{instance:[0-9.]+}", "{instance}").replace(
            "{path:.+}", "{path}")
        assert (path, route.method.lower()) in documented, (path, route.method)
    search = doc["paths"]["/dicomweb/studies"]["get"]
    assert search["tags"] == ["DICOMweb"] and "security" not in search
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []
    retrieve = doc["paths"]["/dicomweb/studies/{study}/series/{series}"]["get"]
    assert [p["name"] for p in retrieve["parameters"]] == ["study", "series"]
    xml = 'multipart/related; type="application/dicom+xml"'
    for path in ("/dicomweb/studies", "/dicomweb/studies/{study}/series/{series}/instances",
                 "/dicomweb/studies/{study}/metadata",
                 "/dicomweb/studies/{study}/series/{series}/instances/{instance}/metadata"):
        content = doc["paths"][path]["get"]["responses"]["200"]["content"]
        assert list(content) == ["application/dicom+json", xml], path
    assert "content" not in retrieve["responses"]["200"]  # instances: multipart DICOM
    quarantine = doc["paths"]["/admin/quarantine"]["get"]
    assert quarantine["tags"] == ["admin"] and "403" in quarantine["responses"]
    assert [p["name"] for p in quarantine["parameters"]] == ["store", "limit", "cursor"]
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


async def test_cors_preflight_and_labels(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    application = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    application.router.add_get("/x", hello)
    setup_cors(application, ("https://viewer.example",))
    async with TestClient(TestServer(application)) as client:
        pre = await client.options("/x", headers={
            "Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert pre.status == 204
        assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
        assert pre.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        ok = await client.get("/x", headers={"Origin": "https://viewer.example"})
        assert ok.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        other = await client.get("/x", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        denied = await client.options("/x", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert "Access-Control-Allow-Origin" not in denied.headers
