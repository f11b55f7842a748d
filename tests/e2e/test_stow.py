"""STOW-RS over a real gateway process: store, find, retrieve, refuse, audit, stream."""

from __future__ import annotations

import asyncio
import io
import os
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Literal

import aiohttp
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from imaging_gateway.dicom.synthetic import SyntheticInstance
from imaging_gateway.services.stow import (
    CANNOT_UNDERSTAND,
    DUPLICATE_SOP_INSTANCE,
    NOT_AUTHORIZED,
    STUDY_UID_MISMATCH,
)
from tests.e2e.conftest import Province, start_province
from tests.e2e.test_dicomweb import audit_rows, parts
from tests.factories import make_corpus, pydicom_file
from tests.support.gateway import cli

STOW_CONFIG = """
[gateway]
province = "110000"
listen = "127.0.0.1:{port}"
data_dir = "data"
write_store = "bj-stow"

[index]
url = "{index_url}"

[[stores]]
name = "bj-fs"
kind = "fs"
path = "store"

[[stores]]
name = "bj-stow"
kind = "fs"
path = "stow-store"
"""
BOUNDARY = "stow-test-boundary-1f6c"
DICOM_JSON = "application/dicom+json"


@pytest.fixture
def stow_province(tmp_path: Path, index_url: str) -> Iterator[Province]:
    """The e2e province (a synced local store), plus an empty local write store for STOW."""
    (tmp_path / "stow-store").mkdir()
    started = start_province(tmp_path, index_url, STOW_CONFIG)
    yield started
    started.gw.stop()


@pytest.fixture
def stow_province_process(tmp_path: Path, index_url: str) -> Iterator[Province]:
    """``stow_province`` as an ``imaging-gateway serve`` process (its memory is measured)."""
    (tmp_path / "stow-store").mkdir()
    started = start_province(tmp_path, index_url, STOW_CONFIG, process=True)
    yield started
    started.gw.stop()


def new_study(seed: int = 23, *, instances: int = 3, series: int = 2,
              pixel_mode: Literal["realistic", "small"] = "small") -> list[SyntheticInstance]:
    """One study not in the province's store (its own seed, so its own UIDs)."""
    return make_corpus(seed=seed, patients=1, modalities=("CT",), charsets=("GB18030",),
                       instances_per_series=instances, series_per_study=series,
                       pixel_mode=pixel_mode)


def multipart(payloads: Sequence[bytes | tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """A STOW-RS body: each payload a part (``application/dicom`` unless a type is given)."""
    chunks = []
    for payload in payloads:
        media_type, data = payload if isinstance(payload, tuple) else ("application/dicom",
                                                                       payload)
        head = f"--{BOUNDARY}\r\n"
        if media_type is not None:
            head += f"Content-Type: {media_type}\r\n"
        chunks += [head.encode(), b"\r\n", data, b"\r\n"]
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


async def stow(http: aiohttp.ClientSession, province: Province, headers: dict[str, str],
               payloads: Sequence[bytes | tuple[str | None, bytes]], study: str | None = None,
               ) -> tuple[int, Dataset | dict]:
    body, ctype = multipart(payloads)
    url = f"{province.gw.base}/dicomweb/studies" + (f"/{study}" if study else "")
    async with http.post(url, data=body, headers={**headers, "Content-Type": ctype}) as r:
        if r.headers.get("Content-Type") == DICOM_JSON:
            return r.status, Dataset.from_json(await r.json(content_type=None))
        return r.status, await r.json()


def failures(ds: Dataset) -> dict[str | None, int]:
    return {item.get("ReferencedSOPInstanceUID") or None: item.FailureReason
            for item in ds.get("FailedSOPSequence", [])}


def referenced(ds: Dataset) -> dict[str, str]:
    return {item.ReferencedSOPInstanceUID: item.RetrieveURL
            for item in ds.get("ReferencedSOPSequence", [])}


def stored_file(province: Province, inst: SyntheticInstance) -> Path:
    return (province.gw.config.parent / "stow-store" / "stow" / inst.study_uid / inst.series_uid
            / f"{inst.sop_uid}.dcm")


def rewritten(data: bytes, **changes: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


async def test_store_then_find_and_retrieve_the_same_bytes(stow_province: Province,
                                                           http: aiohttp.ClientSession) -> None:
    p = stow_province
    study = new_study()
    uid = study[0].study_uid
    me = p.hospital(study[0].hospital.code)
    status, ds = await stow(http, p, me, [i.data for i in study])
    assert status == 200, ds
    assert isinstance(ds, Dataset)
    assert "FailedSOPSequence" not in ds
    base = f"{p.gw.base}/dicomweb"
    assert ds.RetrieveURL == f"{base}/studies/{uid}"
    assert referenced(ds) == {
        i.sop_uid: f"{base}/studies/{uid}/series/{i.series_uid}/instances/{i.sop_uid}"
        for i in study}
    # The documented key layout, byte for byte.
    for inst in study:
        assert stored_file(p, inst).read_bytes() == inst.data
    # Indexed at once: QIDO-RS finds it with its derived counts, WADO-RS returns the bytes.
    async with http.get(f"{base}/studies", params={"StudyInstanceUID": uid}, headers=me) as r:
        assert r.status == 200
        found = await r.json()
    assert found[0]["00201208"]["Value"] == [len(study)]
    assert found[0]["00201206"]["Value"] == [2]
    async with http.get(f"{base}/studies/{uid}", headers=me) as r:
        assert r.status == 200
        got = sorted(parts(await r.read(), r.headers["Content-Type"]))
    assert got == sorted(i.data for i in study)
    # Another hospital sees nothing of it.
    other = next(i.hospital.code for i in p.corpus if i.hospital.code != study[0].hospital.code)
    async with http.get(f"{base}/studies/{uid}", headers=p.hospital(other)) as r:
        assert r.status == 404

    # Re-sent as is: success, nothing rewritten.
    before = {i.sop_uid: os.stat(stored_file(p, i)) for i in study}
    status, again = await stow(http, p, me, [i.data for i in study], study=uid)
    assert status == 200 and set(referenced(again)) == {i.sop_uid for i in study}
    for inst in study:
        st = os.stat(stored_file(p, inst))
        assert (st.st_ino, st.st_mtime_ns) == (before[inst.sop_uid].st_ino,
                                               before[inst.sop_uid].st_mtime_ns)

    # The same SOP Instance UID with other content: refused, the stored object untouched.
    first = study[0]
    changed = rewritten(first.data, SeriesDescription="other content")
    status, ds = await stow(http, p, me, [changed])
    assert status == 409 and failures(ds) == {first.sop_uid: DUPLICATE_SOP_INSTANCE}
    assert stored_file(p, first).read_bytes() == first.data
    assert os.stat(stored_file(p, first)).st_mtime_ns == before[first.sop_uid].st_mtime_ns
    async with http.get(f"{base}/studies/{uid}/series/{first.series_uid}/instances/"
                        f"{first.sop_uid}", headers=me) as r:
        assert parts(await r.read(), r.headers["Content-Type"]) == [first.data]

    # Every store is audited, one record per stored instance, with the patient's token.
    rows = [r for r in await audit_rows(p) if r["action"] == "store"]
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert sum(r["detail"] == "result=stored" for r in ok) == len(study)
    assert [r["detail"] for r in ok if r["detail"] != "result=stored"] == [
        f"identical={len(study)}"]
    assert {r["StudyInstanceUID"] for r in rows} == {uid}
    assert all(r["patient_token"] and r["hospital"] == study[0].hospital.code for r in rows)
    assert [(r["outcome"], r["detail"]) for r in rows if r["outcome"] != "ok"] == [
        ("error", "0111=1")]
    logs = p.gw.logs()
    assert first.patient_id not in logs and first.national_id not in logs
    assert "Traceback" not in logs


async def test_each_bad_part_fails_alone(stow_province: Province,
                                         http: aiohttp.ClientSession) -> None:
    p = stow_province
    study = new_study(seed=29, instances=2, series=1, pixel_mode="realistic")
    good, other = study
    me = p.hospital(good.hospital.code)
    pixel_at = other.data.rfind(b"\xe0\x7f\x10\x00")
    in_pixels = other.data[: pixel_at + (len(other.data) - pixel_at) // 2]
    in_header = other.data[: pixel_at // 2]
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    no_series = rewritten(other.data, SeriesInstanceUID=None)
    status, ds = await stow(http, p, me, [
        good.data, in_pixels, in_header, png, ("text/plain", other.data), no_series,
        other.data[132:]])
    assert status == 202, ds
    assert set(referenced(ds)) == {good.sop_uid}
    reasons = [item.FailureReason for item in ds.FailedSOPSequence]
    assert reasons == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND, CANNOT_UNDERSTAND,
                       CANNOT_UNDERSTAND, 0xA900, CANNOT_UNDERSTAND]
    # Only the good instance is in the store; the truncated one left nothing behind.
    files = sorted(f.name for f in (p.gw.config.parent / "stow-store").rglob("*") if f.is_file())
    assert files == [f"{good.sop_uid}.dcm"]

    # The request's study must be each instance's study.
    status, ds = await stow(http, p, me, [other.data], study="1.2.3.4")
    assert status == 409 and failures(ds) == {other.sop_uid: STUDY_UID_MISMATCH}

    # Request-level errors: media type 415, framing 400; each leaves the store as it was.
    url = f"{p.gw.base}/dicomweb/studies"
    for ctype, body, want in [
        ("application/dicom", other.data, 415),
        ('multipart/related; type="application/dicom+json"; boundary=x', b"--x--", 415),
        ("multipart/related; boundary=x", b"--x--", 415),
        ('multipart/related; type="application/dicom"', b"", 400),
        (f'multipart/related; type="application/dicom"; boundary={BOUNDARY}', b"garbage", 400),
        (f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
         f"--{BOUNDARY}--\r\n".encode(), 400),
    ]:
        async with http.post(url, data=body, headers={**me, "Content-Type": ctype}) as r:
            assert r.status == want, (ctype, body[:20], await r.text())
            assert (await r.json())["message"]
    # A body cut inside a part: what came before is stored, the cut part fails.
    body, ctype = multipart([other.data])
    cut = body[: len(body) // 2]
    async with http.post(url, data=cut, headers={**me, "Content-Type": ctype}) as r:
        assert r.status == 400, await r.text()
    assert not stored_file(p, other).exists()
    async with http.post(url, data=body, headers={**me, "Content-Type": ctype,
                                                  "Accept": "text/html"}) as r:
        assert r.status == 406
    assert not stored_file(p, other).exists()
    status, ds = await stow(http, p, me, [other.data])
    assert status == 200 and stored_file(p, other).read_bytes() == other.data
    assert "Traceback" not in p.gw.logs()


async def test_another_hospitals_study_is_refused_alike(stow_province: Province,
                                                        http: aiohttp.ClientSession) -> None:
    p = stow_province
    nid, home, other = p.shared_patient()
    foreign = sorted(p.studies(hospital=home))[0]
    theirs = [i for i in p.corpus if i.study_uid == foreign]
    me = p.hospital(other)
    mine = new_study(seed=31, instances=1, series=1)[0]

    def produced_by(hospital: str, **changes: object) -> bytes:
        """``mine`` made to say ``hospital`` produced it (and issued its PatientID)."""
        code = Dataset()
        code.CodeValue = hospital
        code.CodingSchemeDesignator = "99CN-NHSA"
        return rewritten(mine.data, InstitutionCodeSequence=[code], IssuerOfPatientID=hospital,
                         **changes)

    async def base_counts() -> list[int]:
        async with http.get(f"{p.gw.base}/dicomweb/studies", params={
                "StudyInstanceUID": foreign}, headers=p.hospital(home)) as r:
            found = await r.json()
        return [found[0]["00201206"]["Value"][0], found[0]["00201208"]["Value"][0]]

    before = await base_counts()
    attempts = {
        # a new instance into their study
        "study": produced_by(other, StudyInstanceUID=foreign),
        # into one of their series (under a new study UID)
        "series": produced_by(other, SeriesInstanceUID=theirs[0].series_uid),
        # one of their SOP instances, with other content
        "instance": produced_by(other, SOPInstanceUID=theirs[0].sop_uid),
        # their patient record (same issuer and PatientID)
        "patient": rewritten(produced_by(other), IssuerOfPatientID=home,
                             PatientID=theirs[0].patient_id),
        # a new study that says another hospital produced it
        "institution": produced_by(home),
    }
    answers = {}
    for what, data in attempts.items():
        status, ds = await stow(http, p, me, [data])
        assert status == 409, (what, ds)
        answers[what] = (status, [(i.ReferencedSOPClassUID, i.FailureReason)
                                  for i in ds.FailedSOPSequence], ds.get("RetrieveURL"))
        assert [i.FailureReason for i in ds.FailedSOPSequence] == [NOT_AUTHORIZED], what
    # The same answer whatever it is that belongs to someone else; nothing about it shows.
    assert len({repr(a[:2]) for a in answers.values()}) == 1
    assert await base_counts() == before
    assert not list((p.gw.config.parent / "stow-store").rglob("*.dcm"))
    async with http.get(f"{p.gw.base}/dicomweb/studies/{foreign}", headers=me) as r:
        assert r.status == 404
    rows = [r for r in await audit_rows(p) if r["action"] == "store"]
    assert [r["outcome"] for r in rows] == ["denied"] * len(attempts)
    assert all(r["detail"] == "0124=1" and r["hospital"] == other for r in rows)
    assert nid not in p.gw.logs()


async def test_only_hospitals_store(stow_province: Province,
                                    http: aiohttp.ClientSession) -> None:
    p = stow_province
    inst = new_study(seed=37, instances=1, series=1)[0]
    nid = inst.national_id
    for who in (p.bearer("--role", "admin"), p.bearer("--role", "peer"),
                p.bearer("--role", "patient", "--national-id", nid)):
        status, body = await stow(http, p, who, [inst.data])
        assert status == 403 and isinstance(body, dict) and body["error"] == "forbidden"
    status, body = await stow(http, p, {}, [inst.data])
    assert status == 401
    assert not stored_file(p, inst).exists()
    rows = await audit_rows(p)
    # An admin is refused on every /dicomweb route before its handler (action dicomweb).
    assert [(r["action"], r["role"], r["outcome"]) for r in rows
            if r["action"] in ("store", "dicomweb")] == [
        ("dicomweb", "admin", "denied"), ("store", "peer", "denied"),
        ("store", "patient", "denied")]


async def test_no_write_store_is_503(province: Province, http: aiohttp.ClientSession) -> None:
    inst = new_study(seed=37, instances=1, series=1)[0]
    status, body = await stow(http, province, province.hospital(inst.hospital.code),
                              [inst.data])
    assert status == 503 and "write_store" in body["message"]
    rows = [r for r in await audit_rows(province) if r["action"] == "store"]
    assert [(r["outcome"], r["detail"]) for r in rows] == [("error", "status-503=1")]


async def test_a_real_client_stores(stow_province: Province) -> None:
    p = stow_province
    study = new_study(seed=41)
    me = p.hospital(study[0].hospital.code)
    client = DICOMwebClient(url=f"{p.gw.base}/dicomweb", headers=me)
    datasets = [pydicom.dcmread(io.BytesIO(i.data)) for i in study]
    result = await asyncio.to_thread(client.store_instances, datasets)
    assert {item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence} == {
        i.sop_uid for i in study}
    back = await asyncio.to_thread(client.retrieve_study, study[0].study_uid)
    assert {ds.SOPInstanceUID for ds in back} == {i.sop_uid for i in study}
    found = await asyncio.to_thread(client.search_for_instances, study[0].study_uid)
    assert len(found) == len(study)
    # Against a given study, and again (idempotent).
    result = await asyncio.to_thread(client.store_instances, datasets, study[0].study_uid)
    assert len(result.ReferencedSOPSequence) == len(study)


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


async def test_a_large_request_streams(stow_province_process: Province,
                                       http: aiohttp.ClientSession) -> None:
    p = stow_province_process
    study = new_study(seed=43, instances=25, series=2, pixel_mode="realistic")
    assert len(study) == 50
    body, ctype = multipart([i.data for i in study])
    me = p.hospital(study[0].hospital.code)
    assert p.gw.proc is not None
    # Warm up (imports, pools) with one instance of another study, then measure.
    warm = new_study(seed=47, instances=1, series=1, pixel_mode="realistic")[0]
    assert (await stow(http, p, p.hospital(warm.hospital.code), [warm.data]))[0] == 200
    peak_before = _peak_rss_kib(p.gw.proc.pid)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    async with http.post(f"{p.gw.base}/dicomweb/studies", data=chunks(),
                         headers={**me, "Content-Type": ctype}) as r:
        assert r.status == 200, await r.text()
        ds = Dataset.from_json(await r.json(content_type=None))
    assert len(ds.ReferencedSOPSequence) == 50
    growth_mib = (_peak_rss_kib(p.gw.proc.pid) - peak_before) / 1024
    # The body is ~25 MiB; streamed, the gateway holds a few chunks at a time.
    assert len(body) > 24 << 20
    assert growth_mib < 8, growth_mib
    for inst in study:
        assert stored_file(p, inst).read_bytes() == inst.data


async def test_a_sync_of_the_write_store_keeps_what_was_stored(
        stow_province: Province, http: aiohttp.ClientSession) -> None:
    p = stow_province
    study = new_study(seed=53)
    me = p.hospital(study[0].hospital.code)
    assert (await stow(http, p, me, [i.data for i in study]))[0] == 200
    for mode in ([], ["--full"]):
        cli(p.gw.config, "sync", "--store", "bj-stow", "--no-progress", *mode)
        async with http.get(f"{p.gw.base}/dicomweb/studies/{study[0].study_uid}/instances",
                            headers=me) as r:
            assert r.status == 200 and len(await r.json()) == len(study), mode
    stats = cli(p.gw.config, "index", "stats", "--json").stdout
    assert '"tombstones": 0' in stats and '"conflicts": 0' in stats


async def test_truncated_instances_are_refused(stow_province: Province,
                                               http: aiohttp.ClientSession) -> None:
    """pydicom's real files, cut inside their pixel data: refused 0xC000, nothing stored."""
    p = stow_province
    me = p.hospital(new_study(seed=59)[0].hospital.code)
    ct = pydicom_file("CT_small.dcm")  # native; whole in the first read
    small_j2k = pydicom_file("JPEG2000.dcm")  # encapsulated; whole in the first read
    j2k = pydicom_file("examples_jpeg2k.dcm")  # encapsulated, 150 KB: checked as it streams
    cut = [ct[:-12000], small_j2k[:3200], small_j2k[:-8], j2k[:100_000]]
    status, ds = await stow(http, p, me, cut)
    assert status == 409, ds
    assert isinstance(ds, Dataset)
    assert [item.FailureReason for item in ds.FailedSOPSequence] == [CANNOT_UNDERSTAND] * 4
    assert not [f for f in (p.gw.config.parent / "stow-store").rglob("*") if f.is_file()]
    rows = [r for r in await audit_rows(p) if r["action"] == "store"]
    assert rows and "truncated" in rows[-1]["detail"], rows[-1]
    # The same files whole are stored.
    status, ds = await stow(http, p, me, [ct, small_j2k, j2k])
    assert status == 200, ds


@pytest.mark.parametrize("ownership", ["prefix", "store"])
async def test_another_producer_named_in_the_instance_is_refused_in_any_write_store(
        tmp_path: Path, index_url: str, http: aiohttp.ClientSession, ownership: str) -> None:
    """README: 0124 when an instance names another producer in InstitutionCodeSequence,
    whatever the write store's ownership (here prefix and store ownership, where the key
    or the store says who produced it and the header's code was not looked at)."""
    mine = new_study(seed=59, instances=1, series=1)[0]
    me_code = mine.hospital.code
    other_code = "H11010800099" if me_code != "H11010800099" else "H11010800098"
    if ownership == "prefix":
        table = f'ownership = "prefix"\n[stores.hospitals]\n"{me_code}/" = "{me_code}"\n' \
                f'"{other_code}/" = "{other_code}"\n'
    else:
        table = f'ownership = "store"\nhospital = "{me_code}"\n'
    (tmp_path / "stow-store").mkdir()
    p = start_province(tmp_path, index_url, STOW_CONFIG + table)
    try:
        me = p.hospital(me_code)
        code = Dataset()
        code.CodeValue = other_code
        code.CodingSchemeDesignator = "99CN-NHSA"
        theirs = rewritten(mine.data, InstitutionCodeSequence=[code])
        status, ds = await stow(http, p, me, [theirs])
        assert status == 409, ds
        assert isinstance(ds, Dataset) and failures(ds) == {mine.sop_uid: NOT_AUTHORIZED}
        assert not list((tmp_path / "stow-store").rglob("*.dcm"))
        async with http.get(f"{p.gw.base}/dicomweb/studies/{mine.study_uid}", headers=me) as r:
            assert r.status == 404
        rows = [r for r in await audit_rows(p) if r["action"] == "store"]
        assert [(r["outcome"], r["detail"]) for r in rows] == [("denied", "0124=1")]
        # Naming the caller itself (as the synthetic instance does) is stored.
        status, ds = await stow(http, p, me, [mine.data])
        assert status == 200, ds
        assert len(list((tmp_path / "stow-store").rglob("*.dcm"))) == 1
        assert "Traceback" not in p.gw.logs()
    finally:
        p.gw.stop()
