"""STOW-RS pure parts: media types, failure reasons, pixel data extents, the response, streaming."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from imaging_gateway.dicom.dicomxml import dataset_to_xml
from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.errors import ConfigError, InvalidRequest, UnsupportedMediaType
from imaging_gateway.services import stow
from imaging_gateway.services.stow import (
    CANNOT_UNDERSTAND,
    DATA_SET_MISMATCH,
    OUT_OF_RESOURCES,
    InstanceResult,
    PixelExtent,
    failure_for,
    is_dicom_part,
    object_key,
    pixel_extent,
    request_boundary,
    response_status,
    store_response,
)
from imaging_gateway.settings import load_settings
from tests.factories import dataset_bytes, make_instance, minimal_dataset

BASE = "https://gw.example/dicomweb"


def test_failure_reasons_follow_the_parser() -> None:
    assert failure_for("missing-uid: StudyInstanceUID") == DATA_SET_MISMATCH == 0xA900
    assert failure_for("invalid-uid: SOPInstanceUID") == DATA_SET_MISMATCH
    for reason in ("empty: zero-byte object", "not-dicom: x", "truncated: y", "unreadable: z"):
        assert failure_for(reason) == CANNOT_UNDERSTAND == 0xC000
    assert (stow.OUT_OF_RESOURCES, stow.STUDY_UID_MISMATCH, stow.PROCESSING_FAILURE,
            stow.DUPLICATE_SOP_INSTANCE, stow.NOT_AUTHORIZED) == (
        0xA700, 0xA901, 0x0110, 0x0111, 0x0124)


def test_object_key_is_the_documented_layout() -> None:
    inst = make_instance()
    header = parse_header(inst.data, complete=True)
    assert object_key(header) == (
        f"stow/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.dcm")


@pytest.mark.parametrize("content_type", [
    'multipart/related; type="application/dicom"; boundary=abc',
    "Multipart/Related; Type=application/dicom; boundary=abc",
    'multipart/related; boundary="abc"; type="application/dicom; transfer-syntax=*"',
])
def test_request_media_type_accepted(content_type: str) -> None:
    assert request_boundary(content_type) == "abc"


@pytest.mark.parametrize("content_type", [
    None, "", "application/dicom", "multipart/related; boundary=abc",
    'multipart/related; type="application/dicom+json"; boundary=abc',
    'multipart/mixed; type="application/dicom"; boundary=abc',
    "application/json",
])
def test_request_media_type_refused_415(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        request_boundary(content_type)
    assert info.value.status == 415 and "multipart/related" in info.value.message


def test_request_without_boundary_is_400() -> None:
    with pytest.raises(InvalidRequest):
        request_boundary('multipart/related; type="application/dicom"')


def test_part_media_type() -> None:
    assert is_dicom_part(None) and is_dicom_part("") and is_dicom_part("application/dicom")
    assert is_dicom_part("Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1")
    assert not is_dicom_part("text/plain")
    assert not is_dicom_part("application/dicom+json")
    assert not is_dicom_part("application/octet-stream")


def _extent(data: bytes) -> tuple[PixelExtent, int]:
    header = parse_header(data, complete=True)
    return pixel_extent(data, header), len(data)


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_defined_length_pixel_data_extent(syntax: str | None) -> None:
    data = dataset_bytes(minimal_dataset(), **({"transfer_syntax": syntax} if syntax else {}))
    extent, size = _extent(data)
    assert extent.end == size and extent.delimiter is None
    assert extent.whole(size, data[-8:]) and not extent.whole(size - 1, data[-9:-1])


def test_encapsulated_pixel_data_must_end_with_its_delimiter() -> None:
    ds = minimal_dataset(PixelData=encapsulate([b"\xff\xd8" + bytes(30) + b"\xff\xd9"]))
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    data = dataset_bytes(ds, transfer_syntax=JPEGBaseline8Bit)
    extent, size = _extent(data)
    assert extent.end is None and extent.delimiter == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert extent.whole(size, data[-8:]) and not extent.whole(size - 8, data[-16:-8])


def test_no_pixel_data_nothing_to_check() -> None:
    data = dataset_bytes(minimal_dataset(PixelData=None))
    extent, _ = _extent(data)
    assert extent == PixelExtent() and extent.whole(0, b"")


def test_response_status_per_ps318() -> None:
    ok = InstanceResult(None, "stored", "1.2", "1.2.3", "1.2.4", "1.2.5")
    bad = InstanceResult(CANNOT_UNDERSTAND, "not-part10")
    assert response_status([ok, ok]) == 200
    assert response_status([ok, bad]) == 202
    assert response_status([bad, bad]) == 409


def test_store_response_module() -> None:
    results = [
        InstanceResult(None, "stored", "1.2.840.10008.5.1.4.1.1.2", "9.1", "9", "9.0"),
        InstanceResult(0x0111, "0111", "1.2.840.10008.5.1.4.1.1.2", "9.2", "9", "9.0"),
        InstanceResult(CANNOT_UNDERSTAND, "not-part10"),
    ]
    body = store_response(results, retrieve_base=BASE, study_uid=None)
    assert list(body) == ["00081190", "00081198", "00081199"]
    ds = Dataset.from_json(json.loads(json.dumps(body)))
    assert ds.RetrieveURL == f"{BASE}/studies/9"
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in ds.FailedSOPSequence] == [
        ("9.2", 0x0111), ("", CANNOT_UNDERSTAND)]
    (item,) = ds.ReferencedSOPSequence
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert item.RetrieveURL == f"{BASE}/studies/9/series/9.0/instances/9.1"
    xml = dataset_to_xml(body).decode()
    assert 'keyword="FailureReason"' in xml and "<Value number=\"1\">17</Value>" not in xml
    assert '<Value number="1">273</Value>' in xml
    # Several studies: the study-level RetrieveURL is present and empty (type 2).
    two = [*results, InstanceResult(None, "stored", "1.2", "8.1", "8", "8.0")]
    assert store_response(two, retrieve_base=BASE, study_uid=None)["00081190"] == {"vr": "UR"}
    assert store_response(two, retrieve_base=BASE, study_uid="7")["00081190"]["Value"] == [
        f"{BASE}/studies/7"]
    only_failed = store_response(results[2:], retrieve_base=BASE, study_uid=None)
    assert "00081199" not in only_failed and only_failed["00081190"] == {"vr": "UR"}


def test_write_store_must_name_a_store(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    stores = '[[stores]]\nname = "a"\nkind = "fs"\npath = "x"\n'
    cfg.write_text('[gateway]\nwrite_store = "b"\n' + stores, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert "gateway.write_store" in str(info.value) and "known: a" in str(info.value)
    cfg.write_text(stores, encoding="utf-8")
    assert load_settings(cfg, environ={}).gateway.write_store is None
    env = {"IMAGING_GATEWAY_GATEWAY__WRITE_STORE": "a"}
    assert load_settings(cfg, environ=env).gateway.write_store == "a"


# -- streaming helpers, over a fake body part -------------------------------------------


class FakePart:
    """A body part that hands out ``data`` in pieces of at most ``piece`` bytes."""

    def __init__(self, data: bytes, piece: int = 1000) -> None:
        self.data = data
        self.piece = piece
        self.at = 0
        self.largest_read = 0

    async def read_chunk(self, size: int = 8192) -> bytes:
        self.largest_read = max(self.largest_read, size)
        n = min(size, self.piece)
        chunk = self.data[self.at : self.at + n]
        self.at += len(chunk)
        return chunk


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize(("other", "same"), [
    (b"abcdefghij" * 50, True),
    (b"abcdefghij" * 50 + b"x", False),
    (b"abcdefghij" * 49, False),
    (b"abcdefghij" * 49 + b"abcdefghiJ", False),
    (b"Xbcdefghij" + b"abcdefghij" * 49, False),
])
async def test_same_content_reads_the_whole_part(other: bytes, same: bool) -> None:
    data = b"abcdefghij" * 50
    part = FakePart(data[100:], piece=37)
    got = await stow._same_content(data[:100], stow._Part(part), pieces(other, 64))  # type: ignore[arg-type]
    assert got is same
    assert part.at == len(data) - 100  # drained, so the next part can be read


async def test_head_reads_only_what_the_header_needs() -> None:
    inst = make_instance(pixel_mode="realistic")
    part = FakePart(inst.data, piece=4096)
    head, ended, header = await stow._read_head(
        stow._Part(part), first=1024, limit=1 << 20, issuers=("CN-RESIDENT-ID",))  # type: ignore[arg-type]
    assert not ended and header.instance.SOPInstanceUID == inst.sop_uid
    assert header.header_bytes < len(head) <= header.header_bytes + 4096 + 12
    assert len(head) < len(inst.data) // 10 and part.largest_read <= stow.CHUNK


@pytest.mark.parametrize(("data", "limit", "failure"), [
    (b"\x00" * 128 + b"DICX" + bytes(500), 1 << 20, CANNOT_UNDERSTAND),
    (b"short", 1 << 20, CANNOT_UNDERSTAND),
    (None, 1024, OUT_OF_RESOURCES),
])
async def test_head_refusals(data: bytes | None, limit: int, failure: int) -> None:
    if data is None:
        # A header longer than the limit: a long description before the pixel data.
        data = dataset_bytes(minimal_dataset(ImageComments="x" * 5000))
    with pytest.raises(stow._Refused) as info:
        await stow._read_head(stow._Part(FakePart(data)), first=512, limit=limit,  # type: ignore[arg-type]
                              issuers=())
    assert info.value.failure == failure


async def test_write_chunks_refuse_a_short_stream() -> None:
    inst = make_instance(pixel_mode="realistic")
    cut = inst.data[: len(inst.data) - 100]
    for data, whole in ((inst.data, True), (cut, False)):
        part = FakePart(data, piece=70_000)
        head, _, header = await stow._read_head(
            stow._Part(part), first=4096, limit=1 << 20, issuers=())  # type: ignore[arg-type]
        written = bytearray()
        extent = pixel_extent(head, header)
        if whole:
            async for chunk in stow._write_chunks(head, stow._Part(part), extent):  # type: ignore[arg-type]
                written += chunk
            assert bytes(written) == data
        else:
            with pytest.raises(stow._Truncated):
                async for chunk in stow._write_chunks(head, stow._Part(part), extent):  # type: ignore[arg-type]
                    written += chunk
