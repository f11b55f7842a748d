"""Pixel requests that could cost the gateway far more than the object: bounded, or 400."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.services.stow import OUT_OF_RESOURCES
from imaging_gateway.settings import load_settings
from tests.e2e.conftest import Province
from tests.e2e.test_stow import (  # noqa: F401 (fixture)
    new_study,
    stow,
    stow_province_process,
)
from tests.factories import deflated_bomb
from tests.support.indexdump import dump_index

BOMB = 1 << 30
"""Bytes of zeros each bomb inflates to (in a file of about 1 MB)."""


@pytest.fixture(scope="module")
def province(module_province_process: Province) -> Province:
    """These tests only read: one gateway process per backend (its memory is measured)
    serves the whole module."""
    return module_province_process


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), in KiB."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1))


def instance_url(province: Province) -> tuple[str, dict[str, str], tuple[int, int]]:
    """A CT instance's URL, its owner's headers and its (columns, rows)."""
    inst = next(i for i in province.corpus if i.modality == "CT")
    url = (f"{province.gw.base}/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}"
           f"/instances/{inst.sop_uid}")
    ds = pydicom.dcmread(io.BytesIO(inst.data), stop_before_pixels=True)
    size = (int(ds.Columns), int(ds.Rows))
    return url, province.hospital(inst.hospital.code), size


async def test_frame_lists_with_repeats_or_too_many_frames_are_400(
        province: Province, http: aiohttp.ClientSession) -> None:
    url, headers, _ = instance_url(province)
    async with http.get(f"{url}/frames/1", headers=headers) as r:
        assert r.status == 200, await r.text()
    repeated = ",".join(["1"] * 2000)
    for frames in (repeated, "1,1", "1,2,1"):
        async with http.get(f"{url}/frames/{frames}", headers=headers) as r:
            assert r.status == 400, (frames[:20], (await r.read())[:200])
            body = await r.json()
            assert body["error"] == "invalid-request" and "frames" in body["message"]
            assert ("twice" if len(frames) < 10 else "at most 1024") in body["message"]
    # More frames than the instance has is 400 naming the bound, before any frame is read.
    async with http.get(f"{url}/frames/1,2", headers=headers) as r:
        assert r.status == 400, (await r.read())[:200]
        body = await r.json()
        assert "frames" in body["message"] and "1 frame" in body["message"]
    # An absolute cap, whatever the instance.
    many = ",".join(str(n) for n in range(1, 1100))
    async with http.get(f"{url}/frames/{many}", headers=headers) as r:
        assert r.status == 400, (await r.read())[:200]
        assert "frames" in (await r.json())["message"]
    # The same repeats on /rendered.
    async with http.get(f"{url}/frames/1,1/rendered", headers=headers) as r:
        assert r.status == 400 and "frames" in (await r.json())["message"]


async def test_rendered_never_upscales_and_refuses_impossible_viewports(
        province: Province, http: aiohttp.ClientSession) -> None:
    url, headers, (columns, rows) = instance_url(province)
    assert province.gw.proc is not None
    async with http.get(f"{url}/rendered", headers=headers) as r:  # warm up
        assert r.status == 200, await r.text()
    before = peak_rss_kib(province.gw.proc.pid)
    # PS3.18 8.3.5.1.3: the aspect is kept, and the server may size down; it never
    # enlarges past the image's own size.
    for viewport in ("512,512", "40000,40000", "65535,65535", "40000,8"):
        async with http.get(f"{url}/rendered?viewport={viewport}",
                            headers={**headers, "Accept": "image/png"}) as r:
            assert r.status == 200, (viewport, (await r.read())[:200])
            image = Image.open(io.BytesIO(await r.read()))
        width, height = (int(v) for v in viewport.split(","))
        scale = min(1.0, width / columns, height / rows)
        assert image.size == (max(1, round(columns * scale)), max(1, round(rows * scale))), (
            viewport, image.size)
    growth_mib = (peak_rss_kib(province.gw.proc.pid) - before) / 1024
    assert growth_mib < 32, growth_mib  # 40000 x 40000 grey would be 1.5 GiB
    # No image has more than 65535 rows or columns (US, PS3.5 6.2): such a viewport is
    # impossible, as are zero and the source-region form.
    for viewport in ("65536,65536", "100000,1", "0,16", "16,0", "1,2,3,4", "16"):
        async with http.get(f"{url}/rendered?viewport={viewport}", headers=headers) as r:
            assert r.status == 400, (viewport, (await r.read())[:200])
            body = await r.json()
            assert body["error"] == "invalid-request" and "viewport" in body["message"]


def sync_peak_rss_kib(config: Path, store: str) -> int:
    """Run ``imaging-gateway sync`` in its own process; its peak RSS (VmHWM), in KiB."""
    code = (
        "import sys\n"
        "from imaging_gateway.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('HWM', hwm.split()[1], file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "sync", "--config", str(config), "--store", store,
         "--no-progress"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r"HWM (\d+)", proc.stderr)
    assert match is not None, proc.stderr[-2000:]
    return int(match.group(1))


async def test_deflate_bombs_are_bounded_at_stow_sync_and_wado(
        stow_province_process: Province, http: aiohttp.ClientSession) -> None:  # noqa: F811
    """A 1 MB deflated object holding 1 GiB of zeros: in its header (a private OB element
    before the pixel data) STOW refuses it and sync quarantines it; after the pixel data
    (trailing padding) the header is small, so it is indexed, and every WADO-RS read that
    inflates it whole is refused: the gateway's memory stays far below the bomb's size."""
    p = stow_province_process
    assert p.gw.proc is not None
    pid = p.gw.proc.pid
    study = new_study(seed=61, instances=3, series=1)
    me = p.hospital(study[0].hospital.code)
    in_header = deflated_bomb(study[0].data, inflated=BOMB, where="header")
    trailing = deflated_bomb(study[1].data, inflated=BOMB, where="trailer")
    assert len(in_header) < 2 << 20 and len(trailing) < 2 << 20
    # Warm up the STOW and WADO paths with a small deflated instance.
    small = deflated_bomb(study[2].data, inflated=1 << 20, where="trailer")
    assert (await stow(http, p, me, [small]))[0] == 200
    base = f"{p.gw.base}/dicomweb/studies/{study[2].study_uid}/series/{study[2].series_uid}"
    async with http.get(f"{base}/instances/{study[2].sop_uid}/metadata", headers=me) as r:
        assert r.status == 200, await r.text()
    before = peak_rss_kib(pid)

    # STOW: refused, out of resources (0xA700), nothing stored.
    status, ds = await stow(http, p, me, [in_header])
    assert status == 409, ds
    assert isinstance(ds, Dataset)
    assert [i.FailureReason for i in ds.FailedSOPSequence] == [OUT_OF_RESOURCES]
    assert (peak_rss_kib(pid) - before) / 1024 < 100  # the bomb is 1024 MiB

    # Sync: the header bomb quarantined with its reason, the trailing one indexed.
    folder = p.gw.config.parent / "store" / "bombs"
    folder.mkdir()
    (folder / "in-header.dcm").write_bytes(in_header)
    (folder / "trailing.dcm").write_bytes(trailing)
    sync_kib = sync_peak_rss_kib(p.gw.config, "bj-fs")
    assert sync_kib / 1024 < 300, sync_kib  # the whole process
    index = await SqlIndex.open(load_settings(p.gw.config).index, migrate=False)
    try:
        dump = await dump_index(index)
    finally:
        await index.close()
    quarantined = {k: r for _, k, _, r in dump["quarantine"]}
    assert quarantined["bombs/in-header.dcm"].startswith("header-too-large: "), quarantined
    assert "bombs/trailing.dcm" in {r[1] for r in dump["instances"]}

    # WADO-RS: what inflates the object whole is refused (406, naming the setting); the
    # object as stored (1 MB) is still served.
    url = f"{base}/instances/{study[1].sop_uid}"
    transcode = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    for path, accept in (("/metadata", "application/dicom+json"), ("/frames/1", "*/*"),
                         ("/rendered", "image/png"), ("/bulkdata/7FE00010", "*/*"),
                         ("", transcode)):
        async with http.get(url + path, headers={**me, "Accept": accept}) as r:
            assert r.status == 406, (path, r.status, (await r.read())[:300])
            body = await r.json()
            assert "inflate" in body["message"] or "transcod" in body["message"], body
    async with http.get(url, headers={**me, "Accept": 'multipart/related; '
                                      'type="application/dicom"; transfer-syntax=*'}) as r:
        assert r.status == 200
        assert len(await r.read()) < len(trailing) + 1024
    growth_mib = (peak_rss_kib(pid) - before) / 1024
    assert growth_mib < 100, growth_mib
