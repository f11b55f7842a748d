"""QIDO-RS includefield over a real gateway: what the index does not return is named in a
Warning (PS3.18 8.3.4, RFC 7234 5.5 warn-code 299), never dropped silently."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Province

MANUFACTURER, BODY_PART, SLICE_THICKNESS = "00080070", "00180015", "00180050"
STUDY_DESCRIPTION, INSTITUTION = "00081030", "00080080"
# One warning: 299 <agent> "<text>" (texts are quoted strings without double quotes).
WARNING = re.compile(r'299 [^ ",]+ "([^"]*)"')


@pytest.fixture(scope="module")
def province(module_province: Province) -> Province:
    """These tests only read: one gateway per backend serves the whole module."""
    return module_province


async def search(http: aiohttp.ClientSession, province: Province, path: str,
                 params: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the results, the Warning texts) of a search by the owner of the shared patient."""
    _, home, _ = province.shared_patient()
    async with http.get(f"{province.gw.base}/dicomweb{path}", params=params,
                        headers=province.hospital(home)) as r:
        assert r.status == 200, await r.text()
        return await r.json(), WARNING.findall(r.headers.get("Warning", ""))


def named(texts: list[str]) -> set[str]:
    """The attribute names listed by includefield warnings."""
    return {name.strip() for t in texts if t.startswith("includefield")
            for name in t.rpartition(":")[2].split(",")}


async def test_includefield_names_what_it_does_not_return(
    province: Province, http: aiohttp.ClientSession
) -> None:
    results, texts = await search(http, province, "/studies", [
        ("includefield", "Manufacturer,StudyDescription"),
        ("includefield", f"BodyPartExamined,{SLICE_THICKNESS},00091010"),
    ])
    # What the index holds at study level comes back; the rest is named, not dropped.
    assert results and all(STUDY_DESCRIPTION in d for d in results)
    assert not any(t in d for d in results for t in (MANUFACTURER, BODY_PART, SLICE_THICKNESS))
    # The tag is named by its keyword; the private tag by its tag, nothing else echoed.
    assert named(texts) == {"Manufacturer", "BodyPartExamined", "SliceThickness", "00091010"}
    # A series search returns BodyPartExamined (the index holds it per series): no warning.
    study = results[0]["0020000D"]["Value"][0]
    series, texts = await search(http, province, f"/studies/{study}/series",
                                 [("includefield", "BodyPartExamined")])
    assert texts == [] and all(BODY_PART in d for d in series)


async def test_includefield_all_is_everything_held_without_a_warning(
    province: Province, http: aiohttp.ClientSession
) -> None:
    results, texts = await search(http, province, "/studies", [("includefield", "all")])
    assert texts == []
    assert results and all(STUDY_DESCRIPTION in d and INSTITUTION in d for d in results)
    assert not any(BODY_PART in d for d in results)
    results, texts = await search(http, province, "/studies",
                                  [("includefield", "all,Manufacturer")])
    assert named(texts) == {"Manufacturer"}
    assert all(STUDY_DESCRIPTION in d and MANUFACTURER not in d for d in results)


async def test_includefield_echoes_no_control_character(
    province: Province, http: aiohttp.ClientSession
) -> None:
    _, home, _ = province.shared_patient()
    for value in ("Manufacturer\r\nX-Injected: 1", "Manu\x00facturer", "Manufacturer\x7f"):
        async with http.get(f"{province.gw.base}/dicomweb/studies",
                            params={"includefield": value},
                            headers=province.hospital(home)) as r:
            assert r.status == 400, value
            body = await r.json()
            assert body["error"] and "includefield" in body["message"]
            assert "X-Injected" not in r.headers
    # Surrounding white space is tolerated; the warning names the attribute, not the input.
    _, texts = await search(http, province, "/studies",
                            [("includefield", "\tManufacturer\n,StudyDescription")])
    assert texts == ["includefield: not returned, this gateway's index does not hold them: "
                     "Manufacturer"]
