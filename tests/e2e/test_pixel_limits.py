"""Pixel requests that could cost the gateway far more than the object: bounded, or 400."""

from __future__ import annotations

import io
import re
from pathlib import Path

import aiohttp
import pydicom
from PIL import Image

from tests.e2e.conftest import Province


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
