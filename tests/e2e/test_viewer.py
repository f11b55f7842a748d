"""The OHIF Viewer, unmodified, in a real Chromium against a real gateway on another origin."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Response,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

from imaging_gateway.dicom.synthetic import SyntheticInstance
from tests.e2e.conftest import PROVINCE_CONFIG, Province, start_province
from tests.e2e.test_dicomweb import audit_rows
from tests.support import ohif
from tests.support.gateway import free_port

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking"]

# OHIF's own configuration for a DICOMweb data source (platform/app/public/config/*.js),
# pointed at the gateway. The bearer token goes through OHIF's userAuthenticationService
# (the hook its DICOMweb data source and image loader ask for the Authorization header):
# the config is a function of the services manager, and the data source's onConfiguration
# hook installs the header when the source is initialized.
APP_CONFIG = """window.config = ({ servicesManager }) => ({
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  defaultDataSourceName: 'gateway',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'gateway',
    configuration: {
      friendlyName: 'imaging-gateway',
      name: 'imaging-gateway',
      qidoRoot: %(root)s,
      wadoRoot: %(root)s,
      wadoUriRoot: %(root)s,
      qidoSupportsIncludeField: true,
      supportsFuzzyMatching: true,
      supportsWildcard: true,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      bulkDataURI: { enabled: true },
      omitQuotationForMultipartRequest: true,
      onConfiguration: (config) => {
        servicesManager.services.userAuthenticationService.setServiceImplementation({
          getAuthorizationHeader: () => ({ Authorization: %(authorization)s }),
        });
        return config;
      },
    },
  }],
});
"""


@dataclass
class Trace:
    """What the browser saw: console errors, failed or refused requests to the gateway."""

    gateway: str
    console: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.console.append(msg.text[:500])

    def on_request(self, request: Request) -> None:
        if request.url.startswith(self.gateway):
            self.requests.append(request.url[len(self.gateway):])

    def on_failed(self, request: Request) -> None:
        self.failures.append(f"{request.url} failed: {request.failure}")

    def on_response(self, response: Response) -> None:
        if response.url.startswith(self.gateway) and response.status >= 400:
            self.failures.append(f"{response.url} -> {response.status}")

    def report(self, province: Province) -> str:
        return json.dumps({"console errors": self.console[-30:],
                           "failed requests": self.failures[-30:],
                           "gateway requests": self.requests[-40:],
                           "gateway log": province.gw.logs()[-3000:]}, indent=1)


def viewer_app(dist: Path, app_config: str) -> web.Application:
    """OHIF's static files with our app-config.js; any other path is the single page."""

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        if name == "app-config.js":
            return web.Response(text=app_config, content_type="application/javascript")
        path = (dist / name).resolve()
        if name and path.is_file() and path.is_relative_to(dist):
            return web.FileResponse(path)
        return web.FileResponse(dist / "index.html")

    app = web.Application()
    app.router.add_get("/{path:.*}", serve)
    return app


@dataclass
class Setup:
    province: Province
    viewer: str
    home: str
    browser: Browser


@pytest.fixture
def viewer_port() -> int:
    """A free port for the viewer's origin, once the browser and the bundle are known there."""
    # Fail, never skip: CI installs both (.ci/run); so does the README's set-up.
    if (reason := ohif.missing()) is not None:
        pytest.fail(reason)
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"Chromium is required at {CHROMIUM} (Debian: apt-get install chromium)")
    return free_port()


@pytest.fixture
def province(tmp_path: Path, viewer_port: int) -> Iterator[Province]:
    # One index backend is enough here: the browser exercises the HTTP surface.
    origin = f"http://127.0.0.1:{viewer_port}"
    config = PROVINCE_CONFIG + f'\n[security]\ncors_origins = ["{origin}"]\n'
    started = start_province(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}", config)
    yield started
    started.gw.stop()


@pytest.fixture
async def setup(province: Province, viewer_port: int) -> AsyncIterator[Setup]:
    _, home, _ = province.shared_patient()
    token = province.token("--role", "hospital", "--hospital", home, "--subject", "ohif")
    app_config = APP_CONFIG % {"root": json.dumps(f"{province.gw.base}/dicomweb"),
                               "authorization": json.dumps(f"Bearer {token}")}
    runner = web.AppRunner(viewer_app(ohif.DIST, app_config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", viewer_port)
    await site.start()
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield Setup(province, f"http://127.0.0.1:{viewer_port}", home, browser)
            finally:
                await browser.close()
    finally:
        await runner.cleanup()


async def new_page(setup: Setup) -> tuple[Page, Trace]:
    page = await setup.browser.new_page(viewport={"width": 1280, "height": 900})
    trace = Trace(f"{setup.province.gw.base}/dicomweb")
    page.on("console", trace.on_console)
    page.on("pageerror", lambda e: trace.console.append(f"pageerror: {e}"))
    page.on("request", trace.on_request)
    page.on("requestfailed", trace.on_failed)
    page.on("response", trace.on_response)
    return page, trace


CANVAS_STATS = """() => {
  const canvas = document.querySelector('canvas.cornerstone-canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  const copy = document.createElement('canvas');
  copy.width = canvas.width;
  copy.height = canvas.height;
  const ctx = copy.getContext('2d');
  ctx.drawImage(canvas, 0, 0);
  const px = ctx.getImageData(0, 0, copy.width, copy.height).data;
  const levels = new Set();
  let lit = 0;
  for (let i = 0; i < px.length; i += 4) {
    levels.add(px[i]);
    if (px[i] > 16) lit++;
  }
  return { levels: levels.size, lit: lit / (px.length / 4) };
}"""


def row_key(name: str, study_date: str) -> tuple[str, str]:
    """A study-list row as OHIF shows it: "Family, Given" (alphabetic group) and the date."""
    family, _, given = name.split("=")[0].partition("^")
    shown = datetime.strptime(study_date, "%Y%m%d").strftime("%d-%b-%Y")
    return f"{family}, {given}" if given else family, shown


async def test_ohif_lists_only_the_hospitals_studies_and_shows_images(setup: Setup) -> None:
    province = setup.province
    page, trace = await new_page(setup)
    own = province.studies(hospital=setup.home)
    first: dict[str, SyntheticInstance] = {}
    for inst in province.corpus:
        first.setdefault(inst.study_uid, inst)

    # 1. The study list: exactly the hospital's own studies, none of another hospital's.
    await page.goto(f"{setup.viewer}/")
    try:
        await page.wait_for_function(
            "n => [...document.querySelectorAll('table tbody tr')]"
            "  .filter(r => r.cells[0]?.innerText.trim()).length >= n",
            arg=len(own), timeout=15000)
    except PlaywrightError as exc:
        raise AssertionError(f"study list did not fill: {exc}\n{trace.report(province)}") from exc
    cells = await page.eval_on_selector_all(
        "table tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))")
    listed = sorted((row[0], row[1][:11]) for row in cells if row and row[0])
    expected = sorted(row_key(first[s].patient_name, first[s].study_date) for s in own)
    assert listed == expected, trace.report(province)
    hidden = sorted(row_key(first[s].patient_name, first[s].study_date)
                    for s in set(first) - own)
    assert not set(hidden) & set(listed)

    # 2. One study in the viewer: metadata and frames through WADO-RS, pixels on the canvas.
    study = sorted(own)[0]
    await page.goto(f"{setup.viewer}/viewer?StudyInstanceUIDs={study}")
    try:
        await page.wait_for_function(
            f"() => ({CANVAS_STATS})()?.levels > 8", timeout=20000, polling=250)
    except PlaywrightError as exc:
        raise AssertionError(f"no image in the viewport: {exc}\n{trace.report(province)}") from exc
    stats = await page.evaluate(CANVAS_STATS)
    assert stats["lit"] > 0.2, (stats, trace.report(province))
    assert not trace.failures and not trace.console, trace.report(province)
    rows = [r for r in await audit_rows(province) if r["subject"] == "ohif"]
    seen = {(r["action"], r["outcome"]) for r in rows if r["StudyInstanceUID"] == study}
    assert {("metadata", "ok"), ("frames", "ok")} <= seen, (seen, trace.report(province))
    assert {r["hospital"] for r in rows} == {setup.home}

    # 3. The same patients' studies at another hospital, opened by UID: the viewer gets
    # nothing (no metadata, no frames), the gateway audits empty searches.
    patients = {first[s].national_id for s in own}
    foreign = sorted(s for s in set(first) - own if first[s].national_id in patients)[0]
    before = len(rows)
    trace.failures.clear()
    await page.goto(f"{setup.viewer}/viewer?StudyInstanceUIDs={foreign}")
    await page.wait_for_load_state("networkidle")
    await page.wait_for_timeout(1000)
    assert (await page.evaluate(CANVAS_STATS) or {"levels": 0})["levels"] <= 1
    fetched = [u for u in trace.requests if foreign in u and "/series/" in u]
    assert fetched == [], trace.report(province)
    rows = [r for r in await audit_rows(province) if r["subject"] == "ohif"][before:]
    assert rows and all(r["action"] == "search" and r["detail"].endswith(" results=0")
                        for r in rows), rows
    logs = province.gw.logs()
    assert "Traceback" not in logs
    assert not any(first[s].patient_id in logs for s in first), "a PatientID in the log"
