"""The OHIF Viewer, unmodified, in a real Chromium against a real gateway on another origin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Response,
    Route,
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

# The gateway's data source for OHIF is the README's app-config.js block, loaded as written
# with only the server URL and the token replaced (ohif.readme_app_config): what a
# hospital copies is what is tested. OHIF 3.13 asks its userAuthenticationService for the
# Authorization header of every QIDO-RS/WADO-RS request; the block's onConfiguration hook
# installs it, so the study list works too. The second test uses OHIF's own shipped config
# with the viewer route's ``?token=`` parameter instead.
SHIPPED_SERVER = "https://d14fa38qiwhyfd.cloudfront.net/dicomweb"
"""The public demo server in OHIF's shipped app-config.js (qidoRoot, wadoRoot, wadoUriRoot)."""
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


# One gateway, one viewer origin and one browser for the module: each test opens its own
# browser context (no shared storage), and the audit rows are told apart by token subject.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def viewer_port() -> int:
    """A free port for the viewer's origin, once the browser and the bundle are known there."""
    # Fail, never skip. The bundle comes from the npm registry on first use (as pip's
    # packages do from PyPI); Chromium is a system package (.ci/run and the README's
    # test command install it).
    if ohif.missing() is not None:
        try:
            ohif.fetch()
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            pytest.fail(f"OHIF bundle could not be fetched ({exc}); run `{ohif.FETCH_COMMAND}`")
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"Chromium is required at {CHROMIUM} (Debian: apt-get install chromium)")
    return free_port()


@pytest.fixture(scope="module")
def province(tmp_path_factory: pytest.TempPathFactory, viewer_port: int) -> Iterator[Province]:
    # One index backend is enough here: the browser exercises the HTTP surface.
    tmp_path = tmp_path_factory.mktemp("viewer")
    origin = f"http://127.0.0.1:{viewer_port}"
    config = PROVINCE_CONFIG + f'\n[security]\ncors_origins = ["{origin}"]\n'
    started = start_province(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite3'}", config)
    yield started
    started.gw.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(province: Province, viewer_port: int) -> AsyncIterator[Setup]:
    _, home, _ = province.shared_patient()
    token = province.token("--role", "hospital", "--hospital", home, "--subject", "ohif")
    config = ohif.readme_app_config(f"{province.gw.base}/dicomweb", token)
    runner = web.AppRunner(viewer_app(ohif.DIST, config), access_log=None)
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


async def new_page(setup: Setup, *, config: str | None = None) -> tuple[Page, Trace]:
    """A page in a fresh browser context; ``config`` replaces the served app-config.js."""
    context = await setup.browser.new_context(viewport={"width": 1280, "height": 900})
    if config is not None:
        body = config

        async def fulfil(route: Route) -> None:
            await route.fulfill(body=body, content_type="application/javascript")

        await context.route(f"{setup.viewer}/app-config.js", fulfil)
    page = await context.new_page()
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


async def image_shown(page: Page, trace: Trace, province: Province) -> None:
    """Wait for the viewport's canvas to show an image: many grey levels, mostly not black."""
    try:
        await page.wait_for_function(
            f"() => ({CANVAS_STATS})()?.levels > 8", timeout=60000, polling=250)
    except PlaywrightError as exc:
        raise AssertionError(f"no image in the viewport: {exc}\n{trace.report(province)}") from exc
    stats = await page.evaluate(CANVAS_STATS)
    assert stats["lit"] > 0.2, (stats, trace.report(province))


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
            arg=len(own), timeout=60000)
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

    # 2. One study opened from the list (its row, then the Basic Viewer mode): metadata
    # and frames through WADO-RS, pixels on the canvas.
    study = sorted(own)[0]
    name, date = row_key(first[study].patient_name, first[study].study_date)
    await page.locator("table tbody tr").filter(has_text=name).filter(has_text=date).click()
    await page.locator('button[title="Basic Viewer"]').click()
    await image_shown(page, trace, province)
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
    async with page.expect_response(lambda r: f"/studies/{foreign}/series" in r.url) as series:
        await page.goto(f"{setup.viewer}/viewer?StudyInstanceUIDs={foreign}")
    assert (await series.value).status == 204
    await page.wait_for_load_state("networkidle")
    assert (await page.evaluate(CANVAS_STATS) or {"levels": 0})["levels"] <= 1
    fetched = [u for u in trace.requests if foreign in u and "/series/" in u]
    assert fetched == [], trace.report(province)
    rows = [r for r in await audit_rows(province) if r["subject"] == "ohif"][before:]
    assert rows and all(r["action"] == "search" and r["detail"].endswith(" results=0")
                        for r in rows), rows
    logs = province.gw.logs()
    assert "Traceback" not in logs
    assert not any(first[s].patient_id in logs for s in first), "a PatientID in the log"


async def test_ohif_opens_a_study_from_a_launch_url_with_its_token(setup: Setup) -> None:
    # OHIF's shipped app-config.js, only its DICOMweb server's URL replaced: the only
    # credential is OHIF's ?token= parameter.
    province = setup.province
    shipped = (ohif.DIST / "app-config.js").read_text(encoding="utf-8")
    assert shipped.count(SHIPPED_SERVER) == 3
    config = shipped.replace(SHIPPED_SERVER, f"{province.gw.base}/dicomweb")
    token = province.token("--role", "hospital", "--hospital", setup.home, "--subject", "ris")
    study = sorted(province.studies(hospital=setup.home))[-1]
    page, trace = await new_page(setup, config=config)
    await page.goto(f"{setup.viewer}/viewer?StudyInstanceUIDs={study}&token={token}")
    await image_shown(page, trace, province)
    assert not trace.failures and not trace.console, trace.report(province)
    # The shipped config asks for server-rendered thumbnails (thumbnailRendering: 'thumbnail').
    assert any("/thumbnail?viewport=" in u for u in trace.requests), trace.report(province)
    assert token not in page.url  # OHIF drops it from the address bar and history
    seen = {(r["action"], r["outcome"]) for r in await audit_rows(province)
            if r["subject"] == "ris" and r["StudyInstanceUID"] == study}
    assert {("metadata", "ok"), ("frames", "ok")} <= seen, (seen, trace.report(province))
