"""WADO-RS metadata of text in every character set: pydicom's charset files through a real
SeaweedFS sync, served as DICOM JSON and XML, which are UTF-8 (PS3.18 F.2, PS3.19 A.1)."""

from __future__ import annotations

import email
import email.policy
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from imaging_gateway.api.keys import TOKENS
from imaging_gateway.app import INDEX, STORES, create_app
from imaging_gateway.settings import load_settings
from imaging_gateway.sync.runner import SyncRunner
from tests.factories import PYDICOM_DATA, dataset_bytes, minimal_dataset
from tests.support.native_dicom import read_back
from tests.support.seaweed import SeaweedServer

# pydicom warns about some of its own charset files (unknown escape sequences, etc.).
pytestmark = [pytest.mark.seaweedfs, pytest.mark.filterwarnings("ignore::UserWarning")]

HOSPITAL = "H11010100013"
XML = 'multipart/related; type="application/dicom+xml"'
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
CHARSET_FILES = sorted(p.name for p in (PYDICOM_DATA / "charset_files").glob("*.dcm"))
# PS3.5 Annex K.2, example 2: "Zhang^XiaoDong=张^小东=" in \ISO 2022 IR 58.
ANNEX_K_IR58 = bytes.fromhex("5A68616E675E5869616F446F6E673D1B242941D5C55E1B242941D0A1B6AB3D20")
IR58 = "ir58.dcm"


def _gb2312(text: str, *, escape: bool = True) -> bytes:
    return (b"\x1b$)A" if escape else b"") + text.encode("gb2312")


def ir58_instance(study: str, series: str, sop: str) -> bytes:
    """GB2312 text as Chinese devices write it: G1 designated by ESC $ ) A (PS3.5 K.2),
    or (the vendor form) GB2312 bytes without the escape; in a sequence item too."""
    ds = minimal_dataset(
        SpecificCharacterSet=["", "ISO 2022 IR 58"],
        StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
    )
    ds.add(DataElement(0x00100010, "PN", ANNEX_K_IR58))
    ds.add(DataElement(0x00081030, "LO", _gb2312("胸部CT平扫")))
    ds.add(DataElement(0x0008103E, "LO", _gb2312("胸部平扫 5mm", escape=False)))
    ds.add(DataElement(0x00080080, "LO", _gb2312("北京协和医院")))
    ds.add(DataElement(0x00080090, "PN", b"Li^JianHua=" + _gb2312("李") + b"^" + _gb2312("建华")))
    code = Dataset()
    code.CodeValue = "CT0101"
    code.CodingSchemeDesignator = "99CN"
    code.add(DataElement(0x00080104, "LO", _gb2312("胸部CT")))
    ds.ProcedureCodeSequence = DicomSequence([code])
    return dataset_bytes(ds)


IR58_EXPECTED = {
    "00100010": [{"Alphabetic": "Zhang^XiaoDong", "Ideographic": "张^小东"}],
    "00081030": ["胸部CT平扫"],
    "0008103E": ["胸部平扫 5mm"],
    "00080080": ["北京协和医院"],
    "00080090": [{"Alphabetic": "Li^JianHua", "Ideographic": "李^建华"}],
    "00081032/0/00080104": ["胸部CT"],
}


def with_own_uids(raw: bytes, n: int) -> tuple[bytes, tuple[str, str, str]]:
    """The file with UIDs of its own (some of pydicom's files share or lack them); every
    other element keeps its bytes (pydicom writes elements it did not decode as read)."""
    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    uids = (f"2.25.{n}1", f"2.25.{n}2", f"2.25.{n}3")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uids[2]
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), uids


def text_values(dataset: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tag path -> Value of every text element (SH, LO, ST, LT, UC, UT, PN), recursively."""
    found: dict[str, Any] = {}
    for tag, element in dataset.items():
        if element["vr"] in TEXT_VRS and element.get("Value"):
            found[prefix + tag] = element["Value"]
        if element["vr"] == "SQ":
            for index, item in enumerate(element.get("Value") or []):
                found.update(text_values(item, f"{prefix}{tag}/{index}/"))
    return found


def charsets(dataset: dict[str, Any]) -> list[Any]:
    """Every SpecificCharacterSet value, the sequence items' included."""
    found = [dataset["00080005"].get("Value")] if "00080005" in dataset else []
    for element in dataset.values():
        if element["vr"] == "SQ":
            for item in element.get("Value") or []:
                found += charsets(item)
    return found


def pydicom_text(raw: bytes) -> dict[str, Any]:
    """What pydicom itself decodes, as DICOM JSON text values."""
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=True)
    ds.decode()
    return text_values(ds.to_json_dict(bulk_data_threshold=1 << 30))


def parts(body: bytes, content_type: str) -> list[bytes]:
    message = email.message_from_bytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body, policy=email.policy.HTTP
    )
    return [p.get_payload(decode=True) for p in message.iter_parts()]  # type: ignore[misc]


@dataclass
class World:
    client: TestClient[Any, Any]
    files: dict[str, tuple[bytes, tuple[str, str, str]]]
    """File name -> (the bytes stored, its study, series and SOP instance UIDs)."""
    auth: dict[str, str]


@pytest.fixture
async def world(seaweedfs: SeaweedServer, tmp_path: Path, index_url: str
                ) -> AsyncIterator[World]:
    files = {name: with_own_uids((PYDICOM_DATA / "charset_files" / name).read_bytes(), n)
             for n, name in enumerate(CHARSET_FILES, start=1)}
    uids = ("2.25.9901", "2.25.9902", "2.25.9903")
    files[IR58] = (ir58_instance(*uids), uids)
    bucket = seaweedfs.make_bucket(f"charsets-{uuid.uuid4().hex[:8]}")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
data_dir = "data"
[index]
url = "{index_url}"
[[stores]]
name = "s3"
kind = "s3"
endpoint = "{seaweedfs.endpoint}"
bucket = "{bucket}"
access_key_env = "AK"
secret_key_env = "SK"
ownership = "store"
hospital = "{HOSPITAL}"
""", encoding="utf-8")
    settings = load_settings(cfg, environ={"AK": seaweedfs.access_key,
                                           "SK": seaweedfs.secret_key})
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        store = app[STORES]["s3"]
        for name, (data, _) in files.items():
            await store.write_stream(f"charsets/{name}", _once(data))
        runner = SyncRunner(settings, app[INDEX], store)
        await runner.start()
        job = await runner.run()
        assert job.status == "succeeded" and job.counters["quarantined"] == 0, job.counters
        token = app[TOKENS].issue(subject="pacs", role="hospital", hospital=HOSPITAL)
        yield World(client, files, {"Authorization": f"Bearer {token}"})


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def metadata(world: World, name: str) -> tuple[bytes, dict[str, Any], bytes]:
    """(the JSON body, its one dataset, the one XML document) of an instance's metadata."""
    study, series, sop = world.files[name][1]
    path = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata"
    r = await world.client.get(path, headers=world.auth)
    assert r.status == 200, await r.text()
    body = await r.read()
    (dataset,) = json.loads(body)
    r = await world.client.get(path, headers={**world.auth, "Accept": XML})
    assert r.status == 200, await r.text()
    (document,) = parts(await r.read(), r.headers["Content-Type"])
    return body, dataset, document


def _assert_utf8_document(body: bytes, dataset: dict[str, Any], document: bytes) -> None:
    assert b"\x1b" not in body and "\x1b" not in body.decode("utf-8")
    assert "\\u001b" not in body.decode("utf-8").lower()
    assert b"\x1b" not in document and b"&#27;" not in document and b"&#x1b;" not in document
    assert charsets(dataset) and all(v == ["ISO_IR 192"] for v in charsets(dataset))
    # The XML document says the same, element for element.
    assert read_back(document) == _without_empty(dataset)


def _without_empty(dataset: dict[str, Any]) -> dict[str, Any]:
    """The JSON as XML carries it: no empty Value arrays, no empty PN components (XML
    has an element per non-empty component, so "^^^^" reads back as "")."""
    out = {}
    for tag, element in dataset.items():
        if element.get("Value") == []:
            continue
        if element["vr"] == "SQ" and element.get("Value"):
            element = {**element, "Value": [_without_empty(i) for i in element["Value"]]}
        if element["vr"] == "PN" and element.get("Value"):
            element = {**element, "Value": [
                {group: text.rstrip("^") for group, text in name.items()}
                for name in element["Value"]]}
        out[tag] = element
    return out


async def test_metadata_of_pydicoms_charset_files_is_utf8(world: World) -> None:
    wrong = []
    for name in CHARSET_FILES:
        body, dataset, document = await metadata(world, name)
        try:
            _assert_utf8_document(body, dataset, document)
            expected = pydicom_text(world.files[name][0])
            assert expected
            assert text_values(dataset) == expected
        except AssertionError as exc:
            wrong.append(f"{name}: {exc}")
    assert not wrong, "\n".join(wrong)


async def test_metadata_of_iso_2022_ir_58_has_no_escapes(world: World) -> None:
    body, dataset, document = await metadata(world, IR58)
    _assert_utf8_document(body, dataset, document)
    values = text_values(dataset)
    assert {path: values.get(path) for path in IR58_EXPECTED} == IR58_EXPECTED
    # The search (from the index) and the metadata (from the stored header) agree.
    study = world.files[IR58][1][0]
    r = await world.client.get("/dicomweb/studies", headers=world.auth, params={
        "StudyInstanceUID": study, "includefield": "StudyDescription"})
    (found,) = await r.json()
    for tag in ("00100010", "00081030"):
        assert found[tag]["Value"] == dataset[tag]["Value"], tag
