"""WADO-RS services on real stores (local directory, SeaweedFS S3) behind a small aiohttp app."""

from __future__ import annotations

import asyncio
import email
import io
import logging
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pydicom
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from pydicom.encaps import encapsulate_extended, generate_frames

from imaging_gateway.api import params
from imaging_gateway.api.middlewares import error_middleware
from imaging_gateway.api.streaming import STREAM_OUTCOME, send_instances, send_parts
from imaging_gateway.crypto.aead import TAG_SIZE, Suite
from imaging_gateway.crypto.envelope import plaintext_length
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.dicom.mediatypes import select_metadata
from imaging_gateway.dicom.pixels import parse_tag_path
from imaging_gateway.dicom.synthetic import SyntheticInstance, generate_instances
from imaging_gateway.domain.records import InstanceLocation
from imaging_gateway.errors import InvalidRequest, NotFound
from imaging_gateway.security import gate
from imaging_gateway.security.access import AccessContext
from imaging_gateway.security.principals import Principal
from imaging_gateway.services import retrieve
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.base import ObjectStore
from imaging_gateway.storage.encrypted import EncryptedStore
from imaging_gateway.storage.factory import open_store
from imaging_gateway.storage.s3 import S3Store
from imaging_gateway.storage.zerocopy import DecryptingBody, OpenBody
from tests.factories import pydicom_file
from tests.support.seaweed import SeaweedServer

# pydicom warns about some of its own test files (odd lengths, retired syntaxes).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ENCRYPTED_STORES = ["fs-encrypted", pytest.param("s3-encrypted", marks=pytest.mark.seaweedfs)]
STORES = ["fs", pytest.param("s3", marks=pytest.mark.seaweedfs), *ENCRYPTED_STORES]
DICOM = 'multipart/related; type="application/dicom"'
OCTET = 'multipart/related; type="application/octet-stream"'
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SEGMENT = 4096
"""Plaintext bytes per segment of the encrypted stores."""

PYDICOM_FILES = {
    "ct": "CT_small.dcm",  # explicit VR LE, trailing (FFFC,FFFC) after the pixel data
    "mr": "MR_small.dcm",
    "mr_implicit": "MR_small_implicit.dcm",
    "mr_big": "MR_small_bigendian.dcm",
    "mr_rle": "MR_small_RLE.dcm",
    "j2k": "JPEG2000.dcm",  # 1 frame, empty BOT
    "rgb_rle": "SC_rgb_rle.dcm",
    "rgb_rle_2": "SC_rgb_rle_2frame.dcm",  # BOT with 2 entries
    "rgb_jpeg": "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL JPEG baseline
    "jpeg_lossless": "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1 (pylibjpeg-libjpeg)
    "j2k_lossless": "MR_small_jp2klossless.dcm",
    "jls": "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (pylibjpeg-libjpeg)
    "dose": "rtdose.dcm",  # implicit VR LE, 15 frames of 32 bits
    "dose_rle": "rtdose_rle.dcm",  # 15 RLE frames, empty BOT
    "deflated": "image_dfl.dcm",
    "ecg": "waveform_ecg.dcm",  # no pixel data, a large WaveformData in a sequence
    "overlay": "examples_overlay.dcm",  # OverlayData (6000,3000) in the header
}


# ---------------------------------------------------------------------------
# Corpus and app


def _eot_file() -> bytes:
    """rtdose_rle re-encapsulated with an Extended Offset Table (PS3.3 C.7.6.3.1.8)."""
    ds = pydicom.dcmread(io.BytesIO(pydicom_file("rtdose_rle.dcm")))
    frames = list(generate_frames(ds.PixelData, number_of_frames=15))
    data, offsets, lengths = encapsulate_extended(frames)
    ds.PixelData = data
    ds["PixelData"].VR = "OB"
    ds.ExtendedOffsetTable = offsets
    ds.ExtendedOffsetTableLengths = lengths
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _monochrome1_file() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(pydicom_file("MR_small.dcm")))
    ds.PhotometricInterpretation = "MONOCHROME1"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


JPEG_2000_PART_2_LOSSLESS = "1.2.840.10008.1.2.4.92"


def _undecodable_file() -> bytes:
    """JPEG2000.dcm relabelled JPEG 2000 Part 2 (a real syntax pydicom has no decoder for)."""
    ds = pydicom.dcmread(io.BytesIO(pydicom_file("JPEG2000.dcm")))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(JPEG_2000_PART_2_LOSSLESS)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _synthetic() -> list[SyntheticInstance]:
    return list(
        generate_instances(
            seed=31,
            patients=1,
            studies_per_patient=1,
            modalities=("CT",),
            pixel_mode="realistic",
            charsets=("GB18030",),
            instances_per_series=3,
            series_per_study=2,
        )
    )


SYNTHETIC = _synthetic()


def _all_objects() -> dict[str, bytes]:
    objects = {name: pydicom_file(file) for name, file in PYDICOM_FILES.items()}
    objects["eot"] = _eot_file()
    objects["mr_mono1"] = _monochrome1_file()
    objects["j2k_part2"] = _undecodable_file()
    for index, instance in enumerate(SYNTHETIC):
        objects[f"syn{index}"] = instance.data
    return objects


OBJECTS = _all_objects()

_CALLER = AccessContext(
    principal=Principal(subject="wado-test", role="hospital", province="110000",
                        token_id="t", hospital="H11010800028"),
)


def released(*locations: InstanceLocation) -> gate.ReleasedInstances:
    """The retrieve service's input, made with the gate module's own token: this suite
    tests the service alone (what the gate releases is tested in test_gate*.py)."""
    return gate.ReleasedInstances(
        tuple(locations), _CALLER, "retrieve", None, gate._GATE
    )


@dataclass
class Corpus:
    store: ObjectStore
    prefix: str
    stores: dict[str, ObjectStore]
    locations: dict[str, InstanceLocation] = field(default_factory=dict)
    outcomes: list[str] = field(default_factory=list)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}.dcm"

    async def put(self, name: str, data: bytes) -> InstanceLocation:
        info = await self.store.write_stream(self.key(name), _chunks(data))
        header = parse_header(data, complete=True)
        location = InstanceLocation(
            StudyInstanceUID=header.study.StudyInstanceUID,
            SeriesInstanceUID=header.series.SeriesInstanceUID,
            SOPInstanceUID=header.instance.SOPInstanceUID,
            SOPClassUID=header.instance.SOPClassUID,
            TransferSyntaxUID=header.instance.TransferSyntaxUID,
            store=self.store.name,
            key=self.key(name),
            etag=info.etag,
            size=info.size,
            header_bytes=header.header_bytes,
            Rows=header.instance.Rows,
            Columns=header.instance.Columns,
            NumberOfFrames=header.instance.NumberOfFrames,
            InstanceNumber=header.instance.InstanceNumber,
        )
        self.locations[name] = location
        return location


async def _chunks(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture(scope="session")
def wado_bucket(seaweedfs: SeaweedServer) -> str:
    return seaweedfs.make_bucket(f"wado-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module", params=STORES)
async def stored_corpus(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Corpus]:
    """Every test object put once per module into a store of each kind (a directory, or a
    prefix of a bucket); tests take it through ``corpus``."""
    folder = tmp_path_factory.mktemp(f"wado-{request.param}")
    async for made in _corpus(request, folder, request.param):
        yield made


@pytest.fixture
def corpus(stored_corpus: Corpus) -> Corpus:
    """The module's stored corpus with this test's own locations, stores and outcomes: a
    test may add objects under new names or put a wrapper in ``stores``; one that changes or
    deletes a stored object takes ``own_corpus``."""
    return replace(stored_corpus, stores=dict(stored_corpus.stores),
                   locations=dict(stored_corpus.locations), outcomes=[])


@pytest.fixture(params=STORES)
async def own_corpus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Corpus]:
    """Every test object put into a fresh store of each kind, for this test alone."""
    async for made in _corpus(request, tmp_path, request.param):
        yield made


@pytest.fixture(params=ENCRYPTED_STORES)
async def encrypted_corpus(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Corpus]:
    """The corpus in an encrypted store only (for tests of what tampering does)."""
    async for made in _corpus(request, tmp_path, request.param):
        yield made


async def _corpus(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> AsyncIterator[Corpus]:
    if kind.startswith("fs"):
        root = tmp_path / "store"
        root.mkdir()
        store = open_store(StoreSettings(name="wado-fs", kind="fs", path=root))
    else:
        weed: SeaweedServer = request.getfixturevalue("seaweedfs")
        store = open_store(
            StoreSettings(
                name="wado-s3",
                kind="s3",
                bucket=request.getfixturevalue("wado_bucket"),
                prefix=f"t-{uuid.uuid4().hex[:10]}/",
                endpoint=weed.endpoint,
                access_key=weed.access_key,
                secret_key=weed.secret_key,
                retries=2,
                timeout_s=10.0,
            )
        )
    if "-encrypted" in kind:
        # The same suite through the one read path of encrypted objects: 4 KiB segments,
        # so frames, bulk data and streams cross many segment boundaries.
        ring = FileKeyring.create(tmp_path / "keyring.json", setting="test", key_id="wado")
        suite = Suite.SM4_GCM if kind.endswith("-sm4") else Suite.AES_256_GCM
        store = EncryptedStore(store, ring, encrypt_writes=True, suite=suite, segment_size=SEGMENT)
    corpus = Corpus(store=store, prefix="studies/", stores={store.name: store})
    await asyncio.gather(*(corpus.put(name, data) for name, data in OBJECTS.items()))
    try:
        yield corpus
    finally:
        await store.close()


def _names(request: web.Request) -> list[str]:
    return [n for n in request.query.get("names", "").split(",") if n]


def make_app(corpus: Corpus) -> web.Application:
    """Routes shaped like the real ones; the handlers only call the service functions."""
    app = web.Application(middlewares=[error_middleware])
    name_of: Callable[[InstanceLocation], str] = lambda loc: next(  # noqa: E731
        n for n, v in corpus.locations.items() if v == loc
    )

    def accept(request: web.Request) -> str | None:
        return request.headers.get("Accept")

    def transcode_max(request: web.Request) -> int:
        return int(request.query.get("max", str(retrieve.TRANSCODE_MAX_BYTES)))

    async def instances(request: web.Request) -> web.StreamResponse:
        locations = [corpus.locations[n] for n in _names(request)]
        chunk = int(request.query.get("chunk", str(retrieve.CHUNK_SIZE)))
        retrieval = retrieve.retrieve_instances(
            released(*locations),
            corpus.stores,
            accept=accept(request),
            chunk_size=chunk,
            transcode_max_bytes=transcode_max(request),
        )
        response = await send_instances(request, retrieval)
        corpus.outcomes.append(response[STREAM_OUTCOME])
        return response

    async def metadata(request: web.Request) -> web.StreamResponse:
        representation = select_metadata(accept(request))
        origin = str(request.url.origin())
        documents = await retrieve.retrieve_metadata(
            released(*(corpus.locations[n] for n in _names(request))),
            corpus.stores,
            bulkdata_base=lambda loc: f"{origin}/inst/{name_of(loc)}",
        )
        return web.json_response(documents, content_type=representation.media_type)

    async def frames(request: web.Request) -> web.StreamResponse:
        body = await retrieve.retrieve_frames(
            released(corpus.locations[request.match_info["name"]]),
            corpus.stores,
            params.parse_frame_list(request.match_info["frames"]),
            accept=accept(request),
            transcode_max_bytes=transcode_max(request),
        )
        return await send_parts(request, body)

    async def bulkdata(request: web.Request) -> web.StreamResponse:
        body = await retrieve.retrieve_bulkdata(
            released(corpus.locations[request.match_info["name"]]),
            corpus.stores,
            request.match_info["path"],
            accept=accept(request),
        )
        return await send_parts(request, body)

    async def rendered(request: web.Request) -> web.StreamResponse:
        query = request.query
        body, media_type = await retrieve.retrieve_rendered(
            released(corpus.locations[request.match_info["name"]]),
            corpus.stores,
            accept=accept(request),
            window=params.parse_window(query["window"]) if "window" in query else None,
            quality=params.parse_quality(query["quality"]) if "quality" in query else None,
            viewport=params.parse_viewport(query["viewport"]) if "viewport" in query else None,
            frame=int(query.get("frame", "1")),
        )
        return web.Response(body=body, content_type=media_type)

    async def thumbnail(request: web.Request) -> web.StreamResponse:
        body, media_type = await retrieve.retrieve_thumbnail(
            released(corpus.locations[request.match_info["name"]]), corpus.stores,
            accept=accept(request),
        )
        return web.Response(body=body, content_type=media_type)

    app.router.add_get("/instances", instances)
    app.router.add_get("/metadata", metadata)
    app.router.add_get("/inst/{name}/frames/{frames}", frames)
    app.router.add_get("/inst/{name}/bulkdata/{path:.+}", bulkdata)
    app.router.add_get("/inst/{name}/rendered", rendered)
    app.router.add_get("/inst/{name}/thumbnail", thumbnail)
    return app


@pytest.fixture
async def client(corpus: Corpus) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(make_app(corpus))) as test_client:
        yield test_client


# ---------------------------------------------------------------------------
# Multipart parsing, three ways


def _boundary(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"')
    raise AssertionError(f"no boundary in {content_type!r}")


def split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """By hand, as dicomweb-client and cornerstone do: split on CRLF--boundary."""
    opening = f"--{boundary}\r\n".encode()
    closing = f"\r\n--{boundary}--\r\n".encode()
    assert body.startswith(opening), "the body must start with the first delimiter"
    assert body.endswith(closing), "the body must end with the close delimiter"
    inner = b"\r\n" + body[: -len(closing)]
    parts = []
    for piece in inner.split(f"\r\n--{boundary}".encode())[1:]:
        assert piece.startswith(b"\r\n")
        head, separator, content = piece[2:].partition(b"\r\n\r\n")
        assert separator
        headers = dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n"))
        parts.append((headers, content))
    return parts


def email_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """With the standard library's MIME parser."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert message.get_content_type() == "multipart/related"
    out = []
    for part in message.get_payload():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part["Content-Type"], payload))
    return out


async def get_parts(
    client: TestClient[Any, Any], url: str, accept: str | None = None
) -> tuple[str, list[tuple[dict[str, str], bytes]]]:
    """GET a multipart resource; parse it with aiohttp, email and by hand, which must agree."""
    headers = {"Accept": accept} if accept is not None else {}
    async with client.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        content_type = response.headers["Content-Type"]
        raw = await response.read()
    # Instances go with a Content-Length (their sizes are indexed), the rest chunked:
    # either way a cut body is detectable.
    if "Content-Length" in response.headers:
        assert int(response.headers["Content-Length"]) == len(raw)
        assert "Transfer-Encoding" not in response.headers
    else:
        assert response.headers.get("Transfer-Encoding", "").lower() == "chunked"
    boundary = _boundary(content_type)
    assert len(boundary) >= 32
    manual = split_multipart(raw, boundary)
    assert [(h["Content-Type"], c) for h, c in manual] == email_parts(content_type, raw)
    for headers_, content in manual:
        if "Content-Length" in headers_:
            assert int(headers_["Content-Length"]) == len(content)
    # aiohttp's streaming reader on a second, identical request (it honours Content-Length).
    via_aiohttp = []
    async with client.get(url, headers=headers) as response:
        reader = aiohttp.MultipartReader.from_response(response)
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            via_aiohttp.append((part.headers["Content-Type"], await part.read(decode=False)))
    assert via_aiohttp == [(h["Content-Type"], c) for h, c in manual]
    return content_type, manual


async def get_once(client: TestClient[Any, Any], url: str) -> list[tuple[dict[str, str], bytes]]:
    """GET a multipart resource once and split it by hand."""
    async with client.get(url) as response:
        assert response.status == 200, await response.text()
        return split_multipart(await response.read(), _boundary(response.headers["Content-Type"]))


def _pixel_frames(data: bytes) -> list[bytes]:
    """The frames as pydicom sees them: native slices, or encapsulated frames."""
    ds = pydicom.dcmread(io.BytesIO(data))
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    pixels = bytes(ds.PixelData)
    size = len(pixels) // count
    return [pixels[i * size : (i + 1) * size] for i in range(count)]


# ---------------------------------------------------------------------------
# Retrieve Study / Series / Instance


async def test_stream_instances_byte_identical(
    client: TestClient[Any, Any], corpus: Corpus
) -> None:
    names = ["syn0", "ct", "j2k", "rgb_rle", "mr_implicit", "deflated", "ecg", "syn1", "syn5"]
    url = f"/instances?names={','.join(names)}"
    content_type, parts = await get_parts(client, url, accept=f"{DICOM}; transfer-syntax=*")
    assert content_type.startswith(f"{DICOM}; boundary=")  # several syntaxes: none named
    assert [content for _, content in parts] == [OBJECTS[n] for n in names]
    for name, (headers, _) in zip(names, parts, strict=True):
        syntax = corpus.locations[name].TransferSyntaxUID
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={syntax}"
    assert corpus.outcomes == ["complete", "complete"]  # get_parts asks twice


async def test_stream_instances_small_chunks_and_many_prefetched(
    client: TestClient[Any, Any],
) -> None:
    names = [f"syn{i}" for i in range(6)] * 3  # 18 parts, more than the prefetch window
    _, parts = await get_parts(client, f"/instances?chunk=4096&names={','.join(names)}")
    assert [c for _, c in parts] == [OBJECTS[n] for n in names]


async def test_head_reads_no_study(corpus: Corpus) -> None:
    recorder = RecordingStore(corpus.store)
    async with TestClient(TestServer(make_app(replace_stores(corpus, recorder)))) as c:
        async with c.head("/instances?names=syn0,syn1,syn2") as response:
            assert response.status == 200
            # One transfer syntax for every part: named on the whole body too.
            assert response.headers["Content-Type"].startswith(
                f"{DICOM}; transfer-syntax={EXPLICIT_LE}; boundary="
            )
            # The length of the body a GET would send, from the index alone.
            length = int(response.headers["Content-Length"])
            assert length > sum(len(OBJECTS[n]) for n in ("syn0", "syn1", "syn2"))
            assert await response.read() == b""
        async with c.get("/instances?names=syn0,syn1,syn2") as response:
            assert len(await response.read()) == length
    assert not recorder.reads
    assert len(recorder.streams) == 3  # the GET's: the HEAD opened no object


async def test_the_boundary_and_etag_name_the_body(client: TestClient[Any, Any]) -> None:
    """An as-stored body is the same bytes on every request (so that byte ranges of one
    are ranges of the next): its boundary and strong ETag follow from the indexed
    versions; another set of instances has others."""
    seen = set()
    for names in ("mr", "mr", "mr,syn0"):
        async with client.get(f"/instances?names={names}") as response:
            body = await response.read()
            seen.add((_boundary(response.headers["Content-Type"]),
                      response.headers["ETag"], body))
            assert response.headers["Accept-Ranges"] == "bytes"
    assert len(seen) == 2
    assert len({b for b, _, _ in seen}) == len({e for _, e, _ in seen}) == 2
    assert all(e.startswith('"') and not e.startswith("W/") for _, e, _ in seen)


async def test_a_broken_off_retrieve_resumes_with_range(corpus: Corpus) -> None:
    names = "syn0,ct,syn1,syn2"
    recorder = RecordingStore(corpus.store)
    recorded = replace_stores(corpus, recorder)
    async with TestClient(TestServer(make_app(recorded))) as c:
        async with c.get(f"/instances?names={names}") as response:
            assert response.status == 200
            whole = await response.read()
            etag = response.headers["ETag"]
            content_type = response.headers["Content-Type"]
        total = len(whole)
        last_key = corpus.locations["syn2"].key
        cases = {
            "bytes=0-0": (0, 1),
            "bytes=100-": (100, total),
            f"bytes={total // 3}-{2 * total // 3}": (total // 3, 2 * total // 3 + 1),
            "bytes=-5000": (total - 5000, total),
            f"bytes={total - 10}-{total + 500}": (total - 10, total),
        }
        for value, (start, stop) in cases.items():
            recorder.streams.clear()
            async with c.get(f"/instances?names={names}",
                             headers={"Range": value, "If-Range": etag}) as response:
                assert response.status == 206, value
                assert response.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{total}"
                assert response.headers["Content-Type"] == content_type
                assert response.headers["ETag"] == etag
                assert await response.read() == whole[start:stop], value
            if value == "bytes=-5000":  # inside the last object: no other is read
                assert recorder.streams == [last_key]
        assert recorded.outcomes[-len(cases):] == ["complete"] * len(cases)
        # Another version named in If-Range, several ranges, a malformed one: all whole.
        for headers in ({"Range": "bytes=0-9", "If-Range": '"stale"'},
                        {"Range": "bytes=0-9,20-29"}, {"Range": "pages=1"}):
            async with c.get(f"/instances?names={names}", headers=headers) as response:
                assert response.status == 200, headers
                assert await response.read() == whole
        async with c.get(f"/instances?names={names}",
                         headers={"Range": f"bytes={total}-"}) as response:
            assert response.status == 416
            assert response.headers["Content-Range"] == f"bytes */{total}"
        # A client that has the body asks whether it changed.
        recorder.streams.clear()
        for tag in (etag, f"W/{etag}", '"other", ' + etag, "*"):
            async with c.get(f"/instances?names={names}",
                             headers={"If-None-Match": tag}) as response:
                assert response.status == 304, tag
                assert response.headers["ETag"] == etag
                assert await response.read() == b""
        assert recorder.streams == []
        async with c.get(f"/instances?names={names}",
                         headers={"If-None-Match": '"other"'}) as response:
            assert response.status == 200


async def test_transcoded_bodies_are_always_whole(client: TestClient[Any, Any]) -> None:
    async with client.get("/instances?names=j2k", headers={
            "Accept": "application/dicom", "Range": "bytes=0-9"}) as response:
        assert response.status == 200
        assert "ETag" not in response.headers
        assert "Accept-Ranges" not in response.headers
        assert len(await response.read()) > 10


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (f"{DICOM}; transfer-syntax=*", 200),
        ("application/dicom", 200),  # j2k transcoded to the default, Explicit VR LE
        ("*/*", 200),
        (f"{DICOM}; transfer-syntax={EXPLICIT_LE}", 200),
        ("application/json", 406),
        (OCTET, 406),
    ],
)
async def test_stream_instances_negotiation(
    client: TestClient[Any, Any], accept: str, status: int
) -> None:
    async with client.get("/instances?names=mr,j2k", headers={"Accept": accept}) as response:
        assert response.status == status
        if status == 406:
            problem = await response.json()
            assert problem["error"] == "not-acceptable"
            assert "1.2.840.10008.1.2.4.91" in problem["message"]
        else:
            await response.read()


async def test_errors_before_the_first_byte_are_json(
    client: TestClient[Any, Any], corpus: Corpus
) -> None:
    corpus.locations["stale"] = replace(corpus.locations["mr"], etag="0" * 32)
    corpus.locations["gone"] = replace(corpus.locations["mr"], key="studies/missing.dcm")
    corpus.locations["elsewhere"] = replace(corpus.locations["mr"], store="other-province")
    for names, status, code in [
        ("stale,ct", 502, "storage-error"),
        ("gone,ct", 404, "object-not-found"),
        ("elsewhere", 502, "storage-error"),
        ("", 404, "not-found"),
    ]:
        async with client.get(f"/instances?names={names}") as response:
            assert response.status == status, names
            problem = await response.json()
            assert problem["error"] == code
            assert "studies/" not in problem["message"]  # keys are never shown


class GatedStore:
    """A real store whose ``read_stream`` of one key waits for a gate to open."""

    def __init__(self, inner: ObjectStore, key: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.key = key
        self.waiting = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_stream(self, key: str, **kw: Any) -> AsyncIterator[bytes]:
        if key == self.key:
            self.waiting.set()
            await self.gate.wait()
        async for chunk in self.inner.read_stream(key, **kw):
            yield chunk


async def _read_until_cut(response: aiohttp.ClientResponse, into: bytearray) -> None:
    async for piece in response.content.iter_any():
        into += piece


async def _get_cut(
    client: TestClient[Any, Any], path: str, corpus: Corpus, into: bytearray
) -> bytes:
    """GET ``path``, whose body must be cut: its boundary, with the bytes that came in
    ``into``, once the handler has recorded its outcome (in ``corpus.outcomes``)."""
    response = await client.get(path)
    assert response.status == 200
    boundary = _boundary(response.headers["Content-Type"]).encode()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(_read_until_cut(response, into), 10)
    response.close()
    for _ in range(100):
        if corpus.outcomes:
            break
        await asyncio.sleep(0.02)
    return boundary


@pytest.mark.parametrize("change", ["delete", "same-size", "longer", "shorter"])
async def test_object_changed_mid_stream_aborts(
    own_corpus: Corpus, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = own_corpus
    target = corpus.locations["syn1"]
    gated = GatedStore(corpus.store, target.key)
    corpus.stores[corpus.store.name] = gated  # type: ignore[assignment]
    caplog.set_level(logging.INFO)
    received = bytearray()
    async with TestClient(TestServer(make_app(corpus))) as test_client:
        response = await test_client.get("/instances?chunk=65536&names=syn0,syn1,syn2")
        assert response.status == 200
        boundary = _boundary(response.headers["Content-Type"]).encode()
        reader = asyncio.create_task(_read_until_cut(response, received))
        await asyncio.wait_for(gated.waiting.wait(), 10)
        original = OBJECTS["syn1"]
        if change == "delete":
            await corpus.store.delete(target.key)
        else:
            data = {
                "same-size": original[:-16] + bytes(16),
                "longer": original + bytes(1000),
                "shorter": original[:-1000],
            }[change]
            await corpus.store.write_stream(target.key, _chunks(data))
        gated.gate.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(reader, 10)
        response.close()
        for _ in range(100):  # the handler returns just after cutting the connection
            if corpus.outcomes:
                break
            await asyncio.sleep(0.02)
    # What arrived: the whole first part, the start of the second, never its end.
    delimiter = b"\r\n--" + boundary
    assert received.startswith(b"--" + boundary + b"\r\n")
    assert received.count(delimiter) == 1, "the changed part must not look complete"
    assert b"--" + boundary + b"--" not in received
    assert corpus.outcomes == ["aborted"]
    aborts = [r for r in caplog.records if "aborted" in r.getMessage()]
    assert aborts
    patient = SYNTHETIC[1]
    for record in caplog.records:
        text = record.getMessage()
        assert patient.patient_id not in text and patient.national_id not in text
        for part in filter(None, patient.patient_name.replace("=", "^").split("^")):
            assert part not in text
        assert target.key not in text


class TappedS3(S3Store):
    """The S3 adapter itself (its class opens bodies, so WADO relays them), recording the
    bodies it opens; a key in ``cut`` gets a body whose connection ends after that many
    bytes (the rest of the object is left unread)."""

    def __init__(self, inner: S3Store, cut: dict[str, int] | None = None) -> None:
        super().__init__(inner._settings)
        self.bodies: list[OpenBody] = []
        self.cut = cut or {}
        self.streams: list[tuple[str, int]] = []

    async def open_body(self, key: str, *, if_match: str | None = None) -> OpenBody | None:
        body = await super().open_body(key, if_match=if_match)
        assert body is not None
        if key in self.cut:
            loop = asyncio.get_running_loop()
            data = body.initial
            while len(data) < self.cut[key]:
                data += await loop.sock_recv(body.sock, self.cut[key] - len(data))
            body.close()
            ours, theirs = socket.socketpair()
            ours.sendall(data[: self.cut[key]])
            ours.close()  # the "store" goes away mid-body
            theirs.setblocking(False)
            body = OpenBody(
                theirs, length=body.length, etag=body.etag, initial=b"", timeout_s=5.0,
                release=lambda sock, _whole: sock.close(),
            )  # fmt: skip
        self.bodies.append(body)
        return body

    def read_stream(self, key: str, **kw: Any) -> AsyncIterator[bytes]:
        self.streams.append((key, kw.get("offset", 0)))
        return super().read_stream(key, **kw)


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.seaweedfs)])
async def s3_corpus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Corpus]:
    """The corpus in the plain S3 store only (the zero-copy relay is its adapter's)."""
    async for made in _corpus(request, tmp_path, request.param):
        yield made


def _s3(corpus: Corpus) -> S3Store:
    assert isinstance(corpus.store, S3Store)
    return corpus.store


async def test_relay_is_used_and_releases_every_body(s3_corpus: Corpus) -> None:
    corpus = s3_corpus
    tapped = TappedS3(_s3(corpus))
    names = [f"syn{i}" for i in range(6)] * 3
    try:
        served = replace_stores(corpus, tapped)
        async with TestClient(TestServer(make_app(served))) as c:
            parts = await get_once(c, f"/instances?names={','.join(names)}")
        assert [content for _, content in parts] == [OBJECTS[n] for n in names]
        assert len(tapped.bodies) == len(names) and not tapped.streams
        assert all(b.delivered == b.length for b in tapped.bodies)
        assert tapped._idle  # whole bodies leave their connections for the next GET
    finally:
        await tapped.close()


async def test_relay_resumes_when_the_store_connection_drops(s3_corpus: Corpus) -> None:
    corpus = s3_corpus
    store = _s3(corpus)
    target = corpus.locations["syn1"]
    tapped = TappedS3(store, cut={target.key: 20_000})  # fits a socket pair's buffer
    try:
        served = replace_stores(corpus, tapped)
        async with TestClient(TestServer(make_app(served))) as c:
            parts = await get_once(c, "/instances?names=syn0,syn1,syn2")
        assert [content for _, content in parts] == [OBJECTS[n] for n in ("syn0", "syn1", "syn2")]
        # The rest of syn1 came from an ordinary ranged stream, from where the relay stopped.
        assert tapped.streams == [(target.key, 20_000)]
        assert served.outcomes == ["complete"]
    finally:
        await tapped.close()


async def test_client_gone_stops_the_store_reads(s3_corpus: Corpus) -> None:
    corpus = s3_corpus
    tapped = TappedS3(_s3(corpus))
    names = [f"syn{i}" for i in range(6)]  # all opened ahead at once (prefetch window)
    served = replace_stores(corpus, tapped)
    loop = asyncio.get_running_loop()
    try:
        async with TestClient(TestServer(make_app(served))) as c:
            # A client with a small receive window that reads 64 KiB and goes away (a reset;
            # one that closes with nothing unread sends a FIN, and a stalled response then
            # notices only when the transport sees the end of its input).
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            await loop.sock_connect(client, (c.server.host, c.server.port))
            request = f"GET /instances?names={','.join(names)} HTTP/1.1\r\nHost: t\r\n\r\n"
            await loop.sock_sendall(client, request.encode())
            got = 0
            while got < 65536:
                got += len(await loop.sock_recv(client, 65536))
            await asyncio.sleep(0.2)  # more arrives unread: closing now resets the connection
            client.close()
            for _ in range(500):
                if served.outcomes:
                    break
                await asyncio.sleep(0.02)
            assert served.outcomes == ["client-gone"]
        assert tapped.bodies, "the relay was used"
        opened = [b for b in tapped.bodies if b._release is not None]
        assert not opened, "every body opened ahead is released"
        assert sum(b.delivered for b in tapped.bodies) < sum(len(OBJECTS[n]) for n in names)
    finally:
        await tapped.close()


class TappedEncrypted(EncryptedStore):
    """An ``EncryptedStore`` (same keys and segments) over a ``TappedS3``, recording the
    bodies it opens for the relay: ``DecryptingBody`` for an encrypted object.

    It writes AES-256-GCM whatever ``store`` writes: a store writing SM4-GCM opens no
    bodies (the ordinary path decrypts on more cores), but SM4 objects in an AES store
    (the province changed suites) are relayed, and so tested here."""

    def __init__(self, store: EncryptedStore, cut: dict[str, int] | None = None) -> None:
        assert isinstance(store.inner, S3Store)
        self.tapped = TappedS3(store.inner, cut=cut)
        super().__init__(
            self.tapped, store.keys, encrypt_writes=True, suite=Suite.AES_256_GCM,
            segment_size=store.segment_size,
        )  # fmt: skip
        self.opened: dict[str, OpenBody] = {}

    async def open_body(self, key: str, *, if_match: str | None = None) -> OpenBody | None:
        body = await super().open_body(key, if_match=if_match)
        assert body is not None
        self.opened[key] = body
        return body


ENCRYPTED_S3 = [
    pytest.param("s3-encrypted", marks=pytest.mark.seaweedfs),
    pytest.param("s3-encrypted-sm4", marks=pytest.mark.seaweedfs),
]


@pytest.fixture(params=ENCRYPTED_S3)
async def enc_s3_corpus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Corpus]:
    """The corpus encrypted (AES-256-GCM, SM4-GCM) in an S3 store, whose bodies the
    decrypting relay moves."""
    async for made in _corpus(request, tmp_path, request.param):
        yield made


def _encrypted(corpus: Corpus) -> EncryptedStore:
    assert isinstance(corpus.store, EncryptedStore)
    return corpus.store


async def _raw(store: EncryptedStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in store.inner.read_stream(key)])


async def test_decrypting_relay_is_byte_exact_and_splices_plain_objects(
    enc_s3_corpus: Corpus,
) -> None:
    corpus = enc_s3_corpus
    store = _encrypted(corpus)
    # Plain objects beside the encrypted ones (hospital uploads): written to the bucket as
    # they are, read back through the same encrypted store.
    plain = Corpus(store=store.inner, prefix="plain/", stores={})
    for name in ("syn3", "ct"):
        corpus.locations[f"plain_{name}"] = await plain.put(name, OBJECTS[name])
    names = [f"syn{i}" for i in range(6)] + ["plain_syn3", "ct", "plain_ct", "syn0"]
    tapped = TappedEncrypted(store)
    try:
        served = replace_stores(corpus, tapped)
        async with TestClient(TestServer(make_app(served))) as c:
            parts = await get_once(c, f"/instances?names={','.join(names)}")
        want = [OBJECTS[n.removeprefix("plain_")] for n in names]
        assert [content for _, content in parts] == want
        assert served.outcomes == ["complete"]
        assert not tapped.tapped.streams, "every body went through the relay"
        for name in names:
            body = tapped.opened[corpus.locations[name].key]
            assert isinstance(body, DecryptingBody) == (not name.startswith("plain_")), name
            assert body.delivered == body.length == corpus.locations[name].size
        assert tapped.tapped._idle, "whole bodies leave their connections for the next GET"
    finally:
        await tapped.close()


async def test_a_store_writing_sm4_streams_the_ordinary_way(enc_s3_corpus: Corpus) -> None:
    """SM4-GCM is the limit where it is written (no SM4 instructions): its bodies are read
    ahead and decrypted on every core, not relayed one at a time."""
    store = _encrypted(enc_s3_corpus)
    reader = TappedEncrypted(store)
    assert reader.can_open_bodies
    sm4 = EncryptedStore(reader.tapped, store.keys, encrypt_writes=True, suite=Suite.SM4_GCM)
    assert not sm4.can_open_bodies
    names = ["syn0", "ct", "syn1"]
    try:
        served = replace_stores(enc_s3_corpus, sm4)
        async with TestClient(TestServer(make_app(served))) as c:
            parts = await get_once(c, f"/instances?names={','.join(names)}")
        assert [content for _, content in parts] == [OBJECTS[n] for n in names]
        assert len(reader.tapped.streams) == len(names), "each read by read_stream"
    finally:
        await reader.close()


def _damaged(raw: bytes, header: int, damage: str) -> tuple[bytes, int]:
    """The object damaged, and the first segment the relay must refuse."""
    step = SEGMENT + TAG_SIZE
    final = (len(raw) - header - 1) // step
    if damage == "tampered":
        pos = header + 5 * step + 100
        return raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1 :], 5
    if damage == "cut-at-boundary":  # the final segment gone: the one before is not final
        return raw[: header + final * step], final - 1
    if damage == "cut-mid-segment":
        return raw[: header + 7 * step + 2000], 7
    assert damage == "extra-bytes"
    return raw + bytes(40), final


@pytest.mark.parametrize(
    "damage", ["tampered", "cut-at-boundary", "cut-mid-segment", "extra-bytes"]
)
async def test_decrypting_relay_stops_before_a_bad_segment(
    enc_s3_corpus: Corpus, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing of the bad segment or after it reaches the client; the response is cut,
    logged as the ordinary path logs an integrity failure, naming the object."""
    corpus = enc_s3_corpus
    store = _encrypted(corpus)
    location = corpus.locations["syn1"]
    layout = await store.layout(location.key)
    assert layout.header is not None
    header = layout.header.length
    data, bad = _damaged(await _raw(store, location.key), header, damage)
    info = await store.inner.write_stream(location.key, _chunks(data))
    # As if the index had been synced from the damaged bucket: its ETag, and the plaintext
    # size its stored size gives (a valid size for the format, so the relay takes it).
    size = plaintext_length(len(data), header_length=header, segment_size=SEGMENT)
    corpus.locations["syn1"] = replace(location, etag=info.etag, size=size)
    caplog.set_level(logging.INFO)
    tapped = TappedEncrypted(store)
    received = bytearray()
    try:
        served = replace_stores(corpus, tapped)
        async with TestClient(TestServer(make_app(served))) as c:
            boundary = await _get_cut(c, "/instances?names=syn0,syn1,syn2", served, received)
        assert served.outcomes == ["aborted"]
        assert isinstance(tapped.opened[location.key], DecryptingBody)
    finally:
        await tapped.close()
    first, delimiter, second = bytes(received).partition(b"\r\n--" + boundary)
    assert delimiter and OBJECTS["syn0"] in first
    assert b"\r\n--" + boundary not in second, "the damaged part must not look complete"
    content = second.partition(b"\r\n\r\n")[2]
    assert len(content) <= bad * SEGMENT and OBJECTS["syn1"].startswith(content)
    aborts = [r.getMessage() for r in caplog.records if "aborted during part 2" in r.getMessage()]
    assert aborts and f"segment {bad} " in aborts[0] and location.key in aborts[0], aborts


async def test_decrypting_relay_refuses_a_bad_first_segment_before_the_response(
    enc_s3_corpus: Corpus,
) -> None:
    """The first segment is verified when the body is opened: a first instance that fails
    there gets the integrity error (naming the object), not a 200 that is then cut; a
    later one cuts the response before any of it is sent."""
    corpus = enc_s3_corpus
    store = _encrypted(corpus)
    for name in ("syn1", "syn2"):
        location = corpus.locations[name]
        layout = await store.layout(location.key)
        assert layout.header is not None
        raw = await _raw(store, location.key)
        damaged = _flip_segment(raw, layout.header.length, 0)
        info = await store.inner.write_stream(location.key, _chunks(damaged))
        corpus.locations[name] = replace(location, etag=info.etag)
    tapped = TappedEncrypted(store)
    received = bytearray()
    try:
        served = replace_stores(corpus, tapped)
        async with TestClient(TestServer(make_app(served))) as c:
            async with c.get("/instances?names=syn1,syn0") as response:
                problem = await response.json(content_type=None)
            assert response.status == 500 and problem["error"] == "integrity-error", problem
            assert corpus.locations["syn1"].key in problem["message"]
            boundary = await _get_cut(c, "/instances?names=syn0,syn2", served, received)
        assert served.outcomes == ["aborted"]
    finally:
        await tapped.close()
    first, delimiter, second = bytes(received).partition(b"\r\n--" + boundary)
    assert delimiter and OBJECTS["syn0"] in first
    assert second.partition(b"\r\n\r\n")[2] == b"", "nothing of the damaged object"


async def test_decrypting_relay_resumes_when_the_store_connection_drops(
    enc_s3_corpus: Corpus,
) -> None:
    corpus = enc_s3_corpus
    store = _encrypted(corpus)
    target = corpus.locations["syn1"]
    layout = await store.layout(target.key)
    assert layout.header is not None
    tapped = TappedEncrypted(store, cut={target.key: 20_000})  # fits a socket pair's buffer
    try:
        served = replace_stores(corpus, tapped)
        async with TestClient(TestServer(make_app(served))) as c:
            parts = await get_once(c, "/instances?names=syn0,syn1,syn2")
        assert [content for _, content in parts] == [OBJECTS[n] for n in ("syn0", "syn1", "syn2")]
        assert served.outcomes == ["complete"]
        # The relay sent the segments wholly received; the rest came from an ordinary
        # ranged stream from the start of the cut segment, pinned to the same version.
        body = tapped.opened[target.key]
        assert isinstance(body, DecryptingBody)
        whole = (20_000 - layout.header.length) // (SEGMENT + TAG_SIZE)
        assert body.delivered == whole * SEGMENT
        start = layout.header.length + whole * (SEGMENT + TAG_SIZE)
        assert tapped.tapped.streams == [(target.key, start)]
    finally:
        await tapped.close()


async def test_decrypting_relay_reads_rewrapped_envelopes(enc_s3_corpus: Corpus) -> None:
    """Objects whose header names a retired key version relay with their sidecar's."""
    corpus = enc_s3_corpus
    store = _encrypted(corpus)
    ring = store.keys
    assert isinstance(ring, FileKeyring)
    names = [f"syn{i}" for i in range(3)]
    assert ring.rotate() == 2
    for name in names:
        assert await store.rewrap_object(corpus.locations[name].key) == "rewrapped"
    ring.retire(1)
    tapped = TappedEncrypted(store)  # fresh caches: the sidecars are read
    try:
        served = replace_stores(corpus, tapped)
        async with TestClient(TestServer(make_app(served))) as c:
            parts = await get_once(c, f"/instances?names={','.join(names)}")
        assert [content for _, content in parts] == [OBJECTS[n] for n in names]
        assert all(isinstance(tapped.opened[corpus.locations[n].key], DecryptingBody) for n in names)
        assert not tapped.tapped.streams
    finally:
        await tapped.close()


# ---------------------------------------------------------------------------
# Metadata


async def test_metadata_round_trips_with_bulkdata_uris(
    client: TestClient[Any, Any], corpus: Corpus
) -> None:
    names = ["ct", "mr_big", "rgb_jpeg", "dose_rle", "deflated", "ecg", "overlay", "syn3"]
    async with client.get(
        f"/metadata?names={','.join(names)}", headers={"Accept": "application/dicom+json"}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/dicom+json")
        documents = await response.json()
    assert len(documents) == len(names)
    by_sop = {d["00080018"]["Value"][0]: d for d in documents}
    uris: list[str] = []

    def bulk(tag: str, vr: str, uri: str) -> bytes:
        uris.append(uri)
        return b""

    for name in names:
        original = pydicom.dcmread(io.BytesIO(OBJECTS[name]), stop_before_pixels=True)
        document = by_sop[original.SOPInstanceUID]
        dataset = pydicom.Dataset.from_json(document, bulk_data_uri_handler=bulk)
        assert dataset.SOPInstanceUID == original.SOPInstanceUID
        assert dataset.StudyInstanceUID == original.StudyInstanceUID
        assert str(dataset.get("PatientName", "")) == str(original.get("PatientName", ""))
        stored = corpus.locations[name].TransferSyntaxUID
        assert document["00083002"] == {"vr": "UI", "Value": [stored]}
        base = f"/inst/{name}/bulkdata/"
        if "ecg" != name:
            pixel = document["7FE00010"]
            assert pixel["BulkDataURI"].endswith(f"{base}7FE00010")
            assert pixel["vr"] in ("OB", "OW")
        assert not any(key.startswith("0002") for key in document)  # no file meta
    # Binary values above the threshold are URIs, nested ones with their item path.
    ecg = by_sop[pydicom.dcmread(io.BytesIO(OBJECTS["ecg"])).SOPInstanceUID]
    waveform = ecg["54000100"]["Value"][0]["54001010"]
    assert waveform["BulkDataURI"].endswith("/inst/ecg/bulkdata/54000100/0/54001010")
    overlay = by_sop[pydicom.dcmread(io.BytesIO(OBJECTS["overlay"])).SOPInstanceUID]
    assert overlay["60003000"]["BulkDataURI"].endswith("/inst/overlay/bulkdata/60003000")
    assert len(uris) >= len(names) + 1


async def test_bulkdata_uris_serve_the_values(client: TestClient[Any, Any]) -> None:
    ecg = pydicom.dcmread(io.BytesIO(OBJECTS["ecg"]))
    _, parts = await get_parts(client, "/inst/ecg/bulkdata/54000100/0/54001010")
    assert [c for _, c in parts] == [ecg.WaveformSequence[0].WaveformData]
    assert parts[0][0]["Content-Type"].startswith("application/octet-stream")
    overlay = pydicom.dcmread(io.BytesIO(OBJECTS["overlay"]))
    _, parts = await get_parts(client, "/inst/overlay/bulkdata/60003000", accept=OCTET)
    assert [c for _, c in parts] == [overlay[0x60003000].value]
    # Pixel data bulkdata is served as its frames.
    _, parts = await get_parts(client, "/inst/dose/bulkdata/7FE00010")
    assert [c for _, c in parts] == _pixel_frames(OBJECTS["dose"])
    for path, status in [
        ("54000100/9/54001010", 404),  # no tenth item
        ("00100010", 404),  # not binary
        ("7FE00008", 404),  # no float pixel data
        ("5400010", 400),
        ("54000100/x/54001010", 400),
        ("54000100/0", 400),
    ]:
        async with client.get(f"/inst/ecg/bulkdata/{path}") as response:
            assert response.status == status, path


async def test_metadata_order_and_chinese_names(corpus: Corpus) -> None:
    order = ["syn5", "syn2", "syn0", "syn4", "syn1", "syn3"]
    documents = await retrieve.metadata(
        released(*(corpus.locations[n] for n in order)),
        corpus.stores,
        bulkdata_base=lambda loc: f"https://gw/{loc.SOPInstanceUID}",
    )
    keys = [
        (d["00200011"]["Value"][0], d["00200013"]["Value"][0], d["00080018"]["Value"][0])
        for d in documents
    ]
    assert keys == sorted(keys)
    assert [k[0] for k in keys] == [1, 1, 1, 2, 2, 2]
    name = documents[0]["00100010"]["Value"][0]
    expected = pydicom.dcmread(io.BytesIO(SYNTHETIC[0].data)).PatientName
    assert name["Alphabetic"] == expected.components[0]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(name.values()))


async def test_metadata_reads_only_headers(corpus: Corpus) -> None:
    recorder = RecordingStore(corpus.store)
    stores = {corpus.store.name: recorder}
    locations = [corpus.locations[n] for n in ("syn0", "ct", "j2k")]
    await retrieve.retrieve_metadata(released(*locations), stores, bulkdata_base=lambda loc: "x")  # type: ignore[arg-type]
    assert not recorder.streams
    for location in locations:
        reads = [r for r in recorder.reads if r[0] == location.key]
        assert reads == [(location.key, 0, location.header_bytes + 12)]


# ---------------------------------------------------------------------------
# Frames


class RecordingStore:
    """A real store that notes every read."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads: list[tuple[str, int, int]] = []
        self.streams: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_range(self, key: str, offset: int, length: int) -> Any:
        self.reads.append((key, offset, length))
        return await self.inner.read_range(key, offset, length)

    def read_stream(self, key: str, **kw: Any) -> AsyncIterator[bytes]:
        self.streams.append(key)
        return self.inner.read_stream(key, **kw)


@pytest.mark.parametrize(
    ("name", "numbers", "part_type"),
    [
        ("dose", [1, 5, 15, 2], f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"),
        ("ct", [1], f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"),
        ("syn2", [1], f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"),
        ("mr_implicit", [1], f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"),
        ("deflated", [1], f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"),
        ("rgb_rle_2", [2, 1], "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"),
        ("dose_rle", [3, 15], "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"),
        ("eot", [1, 7, 15], "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"),
        ("j2k", [1], "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.91"),
        ("rgb_jpeg", [1], "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"),
    ],
)
async def test_frames_equal_pydicom_frames(
    client: TestClient[Any, Any], name: str, numbers: list[int], part_type: str
) -> None:
    content_type, parts = await get_parts(
        client, f"/inst/{name}/frames/{','.join(map(str, numbers))}"
    )
    expected = _pixel_frames(OBJECTS[name])
    assert [c for _, c in parts] == [expected[n - 1] for n in numbers]
    assert all(h["Content-Type"] == part_type for h, _ in parts)
    media_type, syntax = part_type.split("; transfer-syntax=")
    assert content_type.startswith(
        f'multipart/related; type="{media_type}"; transfer-syntax={syntax}; boundary='
    )


async def test_native_frames_read_only_their_ranges(corpus: Corpus) -> None:
    """A frame of a 512x512 CT costs two ranged reads: the header, then the frame."""
    recorder = RecordingStore(corpus.store)
    location = corpus.locations["syn4"]
    frame = _pixel_frames(OBJECTS["syn4"])[0]
    async with TestClient(TestServer(make_app(replace_stores(corpus, recorder)))) as c:
        parts = await get_once(c, "/inst/syn4/frames/1")
    assert parts[0][1] == frame
    assert recorder.reads == [
        (location.key, 0, location.header_bytes + 12),
        (location.key, location.size - len(frame), len(frame)),
    ]
    assert not recorder.streams


def replace_stores(corpus: Corpus, store: Any) -> Corpus:
    return Corpus(
        store=corpus.store,
        prefix=corpus.prefix,
        stores={corpus.store.name: store},
        locations=corpus.locations,
    )


async def test_encapsulated_frames_read_only_their_items(corpus: Corpus) -> None:
    recorder = RecordingStore(corpus.store)
    location = corpus.locations["eot"]
    async with TestClient(TestServer(make_app(replace_stores(corpus, recorder)))) as c:
        parts = await get_once(c, "/inst/eot/frames/7")
    frames = _pixel_frames(OBJECTS["eot"])
    assert parts[0][1] == frames[6]
    (_, header_offset, header_length), (_, _, length) = recorder.reads
    assert header_offset == 0 and header_length < location.header_bytes + 200
    assert length == 8 + len(frames[6]) + (len(frames[6]) % 2)


@pytest.mark.parametrize(
    ("name", "accept", "status"),
    [
        ("rgb_jpeg", f"{OCTET}; transfer-syntax=1.2.840.10008.1.2.4.50", 200),
        ("rgb_jpeg", "multipart/related; type=application/octet-stream; transfer-syntax=*", 200),
        ("mr", 'multipart/related; type="image/jpeg"', 406),  # no JPEG encoder
        ("j2k_part2", OCTET, 406),  # no decoder
        ("mr_big", f"{OCTET}; transfer-syntax=*", 200),
    ],
)
async def test_frames_negotiation(
    client: TestClient[Any, Any], name: str, accept: str, status: int
) -> None:
    async with client.get(f"/inst/{name}/frames/1", headers={"Accept": accept}) as response:
        assert response.status == status, await response.text()
        if status == 200:
            part_type = response.headers["Content-Type"].split(";")[1]
            assert "application/octet-stream" in part_type
    if status == 200:
        _, parts = await get_parts(client, f"/inst/{name}/frames/1", accept=accept)
        assert parts[0][1] == _pixel_frames(OBJECTS[name])[0]
        syntax = parts[0][0]["Content-Type"].partition("transfer-syntax=")[2]
        assert syntax == pydicom.dcmread(io.BytesIO(OBJECTS[name])).file_meta.TransferSyntaxUID


async def test_a_truncated_object_never_gives_a_short_frame(
    client: TestClient[Any, Any], corpus: Corpus
) -> None:
    """Indexed as whole (an index from before the sync checked), yet cut: never a 200."""
    ct = pydicom_file("CT_small.dcm")  # 128 x 128 x 16 bits: 32,768 bytes of pixels
    await corpus.put("ct_cut", ct[:-12000])
    j2k = pydicom_file("examples_jpeg2k.dcm")  # one frame, one 152 KB fragment
    await corpus.put("j2k_cut", j2k[:100_000])
    ybr = pydicom_file("examples_ybr_color.dcm")  # 30 JPEG frames, Basic Offset Table
    offsets = pydicom.encaps.parse_basic_offsets(ybr[35040 + 12 :])
    assert len(offsets) == 30
    # Cut inside the last frame: the other 29 are whole, the last is not.
    await corpus.put("ybr_cut", ybr[: 35040 + 12 + 8 + 120 + offsets[-1] + 100])
    for url in (
        "/inst/ct_cut/frames/1",
        "/inst/ct_cut/rendered",
        "/inst/ct_cut/bulkdata/7FE00010",
        "/inst/j2k_cut/frames/1",
        "/inst/ybr_cut/frames/30",
    ):
        async with client.get(url, headers={"Accept": "*/*"}) as response:
            assert response.status == 500, (url, response.status)
            body = await response.json()
            assert body["error"] == "integrity-error", url
            assert "truncated" in body["message"], (url, body)
    parts = await get_parts(client, "/inst/ybr_cut/frames/29", "*/*")
    assert len(parts[1]) == 1


async def test_frame_numbers_out_of_range(client: TestClient[Any, Any], corpus: Corpus) -> None:
    for url, status in [
        ("/inst/dose/frames/16", 404),
        ("/inst/dose/frames/1,16", 404),
        ("/inst/mr/frames/2", 404),
        ("/inst/dose/frames/0", 400),
        ("/inst/dose/frames/1,,2", 400),
        ("/inst/ecg/frames/1", 404),  # no pixel data
    ]:
        async with client.get(url) as response:
            assert response.status == status, url
    with pytest.raises(InvalidRequest):
        await retrieve.retrieve_frames(
            released(corpus.locations["dose"]),
            corpus.stores,
            [],
            accept=None,
        )


# ---------------------------------------------------------------------------
# Rendered and thumbnail


async def _image(client: TestClient[Any, Any], url: str, accept: str | None = None) -> Image.Image:
    headers = {"Accept": accept} if accept else {}
    async with client.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        body = await response.read()
        image = Image.open(io.BytesIO(body))
        image.load()
        expected = {"JPEG": "image/jpeg", "PNG": "image/png"}[image.format or ""]
        assert response.headers["Content-Type"] == expected
    return image


async def test_rendered_ct_window_changes_output(client: TestClient[Any, Any]) -> None:
    default = await _image(client, "/inst/syn0/rendered")
    assert default.format == "JPEG" and default.size == (512, 512) and default.mode == "L"
    soft = np.asarray(await _image(client, "/inst/syn0/rendered?window=40,400", "image/png"))
    bone = np.asarray(await _image(client, "/inst/syn0/rendered?window=1000,100", "image/png"))
    assert soft.shape == (512, 512)
    assert not np.array_equal(soft, bone)
    # Exactly the linear VOI function on HU (PS3.3 C.11.2.1.2.1).
    ds = pydicom.dcmread(io.BytesIO(OBJECTS["syn0"]))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint(np.clip((hu - 39.5) / 399 + 0.5, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(soft, expected)
    assert soft[0, 0] == 0 and soft[256, 256] > 100  # air is black, soft tissue grey


async def test_rendered_parameters(client: TestClient[Any, Any]) -> None:
    small = await _image(client, "/inst/syn0/rendered?viewport=128,64&quality=50")
    assert small.size == (64, 64)
    tall = await _image(client, "/inst/j2k/rendered?viewport=100,100")
    assert tall.size == (25, 100)  # 256 x 1024 kept in proportion
    big = await _image(client, "/inst/mr/rendered?viewport=128,128")
    assert big.size == (64, 64)  # never enlarged past the image's own size
    for query in ("window=1,0", "quality=0", "viewport=0,10", "viewport=1,2,3,4", "window=a,b",
                  "viewport=65536,10"):
        async with client.get(f"/inst/mr/rendered?{query}") as response:
            assert response.status == 400, query


async def test_rendered_monochrome1_is_inverted(client: TestClient[Any, Any]) -> None:
    normal = np.asarray(await _image(client, "/inst/mr/rendered?window=600,1200", "image/png"))
    inverted = np.asarray(
        await _image(client, "/inst/mr_mono1/rendered?window=600,1200", "image/png")
    )
    assert np.array_equal(inverted, 255 - normal)


async def test_rendered_colour_passes_through(client: TestClient[Any, Any]) -> None:
    for name in ("rgb_rle", "rgb_jpeg"):
        image = await _image(client, f"/inst/{name}/rendered", "image/png")
        assert image.mode == "RGB"
        expected = pydicom.dcmread(io.BytesIO(OBJECTS[name])).pixel_array
        assert np.array_equal(np.asarray(image), expected)


async def test_rendered_other_syntaxes(client: TestClient[Any, Any]) -> None:
    for name, size in [
        ("j2k", (256, 1024)),
        ("mr_big", (64, 64)),
        ("mr_rle", (64, 64)),
        ("deflated", (512, 512)),
        ("eot", (10, 10)),
        ("ct", (128, 128)),
    ]:
        image = await _image(client, f"/inst/{name}/rendered", "image/png")
        assert image.size == size, name
        assert np.asarray(image).std() > 0, name
    # Frames of a multi-frame instance render separately.
    first = np.asarray(await _image(client, "/inst/dose/rendered?frame=1", "image/png"))
    last = np.asarray(await _image(client, "/inst/dose/rendered?frame=15", "image/png"))
    assert first.shape == last.shape == (10, 10)
    # pydicom decodes big endian and little endian to the same image.
    little = np.asarray(await _image(client, "/inst/mr/rendered", "image/png"))
    big = np.asarray(await _image(client, "/inst/mr_big/rendered", "image/png"))
    assert np.array_equal(little, big)


async def test_rendered_refusals(client: TestClient[Any, Any]) -> None:
    for url, accept, status, code in [
        ("/inst/j2k_part2/rendered", None, 406, "not-acceptable"),
        ("/inst/mr/rendered", "image/gif", 406, "not-acceptable"),
        ("/inst/mr/rendered", "application/dicom", 406, "not-acceptable"),
        ("/inst/ecg/rendered", None, 404, "not-found"),
        ("/inst/dose/rendered?frame=16", None, 404, "not-found"),
    ]:
        headers = {"Accept": accept} if accept else {}
        async with client.get(url, headers=headers) as response:
            assert response.status == status, url
            assert (await response.json())["error"] == code


async def test_thumbnail(client: TestClient[Any, Any], corpus: Corpus) -> None:
    image = await _image(client, "/inst/syn0/thumbnail")
    assert image.format == "JPEG" and image.size == (128, 128)
    small = await _image(client, "/inst/rgb_rle/thumbnail", "image/png")
    assert small.size == (100, 100)  # never enlarged
    tall = await _image(client, "/inst/j2k/thumbnail")
    assert tall.size == (32, 128)
    chosen = retrieve.representative_instance([corpus.locations[f"syn{i}"] for i in range(6)])
    assert chosen.InstanceNumber == 2
    with pytest.raises(NotFound):
        retrieve.representative_instance([corpus.locations["ecg"]])


# ---------------------------------------------------------------------------
# Request parameters


def test_parameter_parsers() -> None:
    assert params.parse_frame_list("3,1,2") == [3, 1, 2]
    assert params.parse_window("40,400") == (40.0, 400.0)
    assert params.parse_window("-600.5, 1500, linear") == (-600.5, 1500.0)
    assert params.parse_viewport("512,256") == (512, 256)
    assert params.parse_quality("75") == 75
    assert parse_tag_path("7FE00010") == (0x7FE00010,)
    assert parse_tag_path("00540016/0/00181072") == (0x00540016, 0, 0x00181072)
    bad: list[tuple[Callable[[str], object], str]] = [
        (params.parse_frame_list, ""),
        (params.parse_frame_list, "0"),
        (params.parse_frame_list, "1,-2"),
        (params.parse_frame_list, "1.5"),
        (params.parse_frame_list, "3,1,3"),
        (params.parse_frame_list, ",".join(str(n) for n in range(1, params.MAX_FRAME_LIST + 2))),
        (params.parse_viewport, "65536,10"),
        (params.parse_window, "40"),
        (params.parse_window, "40,0"),
        (params.parse_window, "40,400,sigmoid"),
        (params.parse_window, "nan,400"),
        (params.parse_viewport, "0,10"),
        (params.parse_viewport, "10"),
        (params.parse_viewport, "10,10,0,0,5,5"),
        (params.parse_quality, "101"),
        (params.parse_quality, "high"),
        (parse_tag_path, "7FE0001"),
        (parse_tag_path, "00540016/0"),
        (parse_tag_path, "00540016/a/00181072"),
    ]
    for parse, text in bad:
        with pytest.raises(InvalidRequest):
            parse(text)


def _flip_segment(data: bytes, header_length: int, segment: int) -> bytes:
    pos = header_length + segment * (SEGMENT + TAG_SIZE) + 100
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


async def test_tampered_encrypted_object_is_refused(
    encrypted_corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment that fails its tag aborts the stream before any of its bytes go out; a
    tampered header segment fails the metadata request with an integrity error."""
    corpus = encrypted_corpus
    store = corpus.store
    assert isinstance(store, EncryptedStore)
    caplog.set_level(logging.INFO)
    for name, segment in (("syn1", 5), ("syn2", 0)):
        location = corpus.locations[name]
        layout = await store.layout(location.key)
        assert layout.header is not None
        raw = b"".join([c async for c in store.inner.read_stream(location.key)])
        info = await store.inner.write_stream(
            location.key, _chunks(_flip_segment(raw, layout.header.length, segment))
        )
        # As if the index had been synced from the tampered bucket (same ETag).
        corpus.locations[name] = replace(location, etag=info.etag)

    received = bytearray()
    async with TestClient(TestServer(make_app(corpus))) as test_client:
        path = "/instances?chunk=65536&names=syn0,syn1"
        boundary = await _get_cut(test_client, path, corpus, received)
        metadata = await test_client.get("/metadata?names=syn2")
        problem = await metadata.json(content_type=None)
    assert corpus.outcomes == ["aborted"]
    delimiter = b"\r\n--" + boundary
    first, _, second = bytes(received).partition(delimiter)
    assert OBJECTS["syn0"] in first
    content = second.partition(b"\r\n\r\n")[2]
    # Only segments 0..4 of syn1 verified: nothing of segment 5 or later went out.
    assert len(content) <= 5 * 4096 and OBJECTS["syn1"].startswith(content)
    assert metadata.status == 500 and problem["error"] == "integrity-error", problem
    assert corpus.locations["syn2"].key in problem["message"]
    for patient in SYNTHETIC:
        assert patient.national_id not in str(problem)
        for record in caplog.records:
            assert patient.national_id not in record.getMessage()


# ---------------------------------------------------------------------------
# Transcoding (PS3.18 8.7.3): other transfer syntaxes than the stored one

RLE = "1.2.840.10008.1.2.5"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
IMPLICIT_LE = "1.2.840.10008.1.2"
LOSSY_SOURCES = {"rgb_jpeg", "j2k"}


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _part_syntax(headers: dict[str, str]) -> str:
    media_type, _, syntax = headers["Content-Type"].partition("; transfer-syntax=")
    assert media_type == "application/dicom"
    return syntax


@pytest.mark.parametrize(
    "name",
    [
        "rgb_jpeg",  # JPEG baseline, YBR_FULL (lossy)
        "jpeg_lossless",  # JPEG lossless SV1
        "j2k_lossless",  # JPEG 2000 lossless
        "j2k",  # JPEG 2000 (lossy)
        "mr_rle",  # RLE
        "rgb_rle_2",  # RLE, 2 colour frames
        "jls",  # JPEG-LS lossless
        "mr_implicit",  # uncompressed, implicit VR
        "deflated",
    ],
)
async def test_transcode_to_explicit_vr_little_endian(
    client: TestClient[Any, Any], name: str
) -> None:
    original = _dataset(OBJECTS[name])
    expected = original.pixel_array  # pydicom's own decode of the stored object
    for accept in (f"{DICOM}; transfer-syntax={EXPLICIT_LE}", DICOM, "application/dicom"):
        content_type, parts = await get_parts(client, f"/instances?names={name}", accept=accept)
        assert content_type.startswith(f"{DICOM}; transfer-syntax={EXPLICIT_LE}; boundary=")
        [(headers, content)] = parts
        assert _part_syntax(headers) == EXPLICIT_LE
        got = _dataset(content)
        assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert not got.file_meta.TransferSyntaxUID.is_compressed
        assert got.SOPInstanceUID == original.SOPInstanceUID  # a lossless change: same instance
        assert got.PatientID == original.PatientID
        assert got.pixel_array.shape == expected.shape
        assert np.array_equal(got.pixel_array, expected)
        if name in LOSSY_SOURCES:
            assert got.LossyImageCompression == "01"  # PS3.3 C.7.6.1.1.5


async def test_wildcard_sends_the_stored_bytes(client: TestClient[Any, Any]) -> None:
    names = ["rgb_jpeg", "j2k_lossless", "mr_rle", "jls", "j2k_part2", "mr_implicit", "mr_big"]
    for accept in (f"{DICOM}; transfer-syntax=*", "application/dicom; transfer-syntax=*"):
        _, parts = await get_parts(client, f"/instances?names={','.join(names)}", accept=accept)
        # get_parts checks the body had a Content-Length: the as-stored path, unparsed.
        assert [content for _, content in parts] == [OBJECTS[n] for n in names]
        assert [_part_syntax(h) for h, _ in parts] == [
            _dataset(OBJECTS[n]).file_meta.TransferSyntaxUID for n in names
        ]


@pytest.mark.parametrize("target", [RLE, J2K_LOSSLESS, IMPLICIT_LE])
@pytest.mark.parametrize("name", ["ct", "mr", "syn1", "rgb_rle"])
async def test_compress_uncompressed_and_back(
    client: TestClient[Any, Any], name: str, target: str
) -> None:
    original = _dataset(OBJECTS[name])
    accept = f"{DICOM}; transfer-syntax={target}"
    _, [(headers, content)] = await get_parts(client, f"/instances?names={name}", accept=accept)
    assert _part_syntax(headers) == target
    got = _dataset(content)
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(got.pixel_array, original.pixel_array)  # lossless round trip
    if target != IMPLICIT_LE:
        assert got.file_meta.TransferSyntaxUID.is_compressed
        assert "LossyImageCompression" not in got or got.LossyImageCompression != "01"


async def test_mixed_study_one_syntax_out(client: TestClient[Any, Any]) -> None:
    names = ["syn0", "rgb_jpeg", "mr_rle", "ct", "j2k_lossless", "jls", "mr_implicit", "syn1"]
    url = f"/instances?names={','.join(names)}"
    _, parts = await get_parts(client, url, accept=DICOM)
    assert [_part_syntax(h) for h, _ in parts] == [EXPLICIT_LE] * len(names)
    for name, (_, content) in zip(names, parts, strict=True):
        if _dataset(OBJECTS[name]).file_meta.TransferSyntaxUID == EXPLICIT_LE:
            assert content == OBJECTS[name]  # already in the asked syntax: copied as stored
        assert np.array_equal(_dataset(content).pixel_array, _dataset(OBJECTS[name]).pixel_array)
    # q-values: RLE preferred, as stored acceptable; every instance comes as RLE.
    accept = f"{DICOM}; transfer-syntax={RLE}, {DICOM}; transfer-syntax=*; q=0.5"
    _, parts = await get_parts(client, url, accept=accept)
    assert [_part_syntax(h) for h, _ in parts] == [RLE] * len(names)
    assert [_dataset(c).SOPInstanceUID for _, c in parts] == [
        _dataset(OBJECTS[n]).SOPInstanceUID for n in names
    ]


@pytest.mark.parametrize(
    ("names", "accept", "reason"),
    [
        ("j2k_part2", DICOM, "no decoder"),  # stored in a syntax nothing here decodes
        ("mr,j2k_part2", f"{DICOM}; transfer-syntax={EXPLICIT_LE}", "no decoder"),
        ("mr", f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.80", "no encoder"),  # JPEG-LS
        ("mr", f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.91", "lossy"),
        ("mr", f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.50", "lossy"),
        ("mr_big", DICOM, "Big Endian"),
    ],
)
async def test_transcoding_impossible_is_406_with_the_reason(
    client: TestClient[Any, Any], corpus: Corpus, names: str, accept: str, reason: str
) -> None:
    async with client.get(f"/instances?names={names}", headers={"Accept": accept}) as response:
        assert response.status == 406
        problem = await response.json()
    assert problem["error"] == "not-acceptable"
    assert reason in problem["message"]
    assert corpus.outcomes == []  # refused before any part


async def test_oversize_instance_is_406_not_loaded(
    client: TestClient[Any, Any], corpus: Corpus
) -> None:
    location = corpus.locations["mr_rle"]
    pixels = (location.Rows or 0) * (location.Columns or 0)
    accept = {"Accept": f"{DICOM}; transfer-syntax={EXPLICIT_LE}"}
    # The index's figures already exceed the bound: refused before anything is read.
    url = f"/instances?names=mr_rle&max={location.size + pixels - 1}"
    async with client.get(url, headers=accept) as response:
        assert response.status == 406
        assert "too large to transcode" in (await response.json())["message"]
    # Passes the index check, but 16-bit decoded pixels need more: refused from the header.
    url = f"/instances?names=mr_rle&max={location.size + pixels + 1}"
    async with client.get(url, headers=accept) as response:
        assert response.status == 406
        assert "configured maximum" in (await response.json())["message"]
    # Enough memory: transcoded.
    url = f"/instances?names=mr_rle&max={location.size + 2 * pixels}"
    async with client.get(url, headers=accept) as response:
        assert response.status == 200
        await response.read()
    # As stored needs no memory bound.
    url = "/instances?names=mr_rle&max=1"
    star = {"Accept": f"{DICOM}; transfer-syntax=*"}
    async with client.get(url, headers=star) as response:
        assert response.status == 200
        assert OBJECTS["mr_rle"] in await response.read()


async def test_oversize_later_instance_aborts_the_stream(
    client: TestClient[Any, Any], corpus: Corpus
) -> None:
    location = corpus.locations["mr_rle"]
    pixels = (location.Rows or 0) * (location.Columns or 0)
    url = f"/instances?names=ct,mr_rle&max={location.size + pixels + 1}"
    accept = {"Accept": f"{DICOM}; transfer-syntax=*, {DICOM}; transfer-syntax={EXPLICIT_LE}"}
    # ct goes as stored; mr_rle as stored too (ties go to as stored)...
    async with client.get(url, headers=accept) as response:
        assert response.status == 200
        await response.read()
    # ...but asked for explicitly, it passes the index check and fails after ct was sent.
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(url, headers={"Accept": DICOM}) as response:
            assert response.status == 200
            await response.read()
    assert corpus.outcomes[-1] == "aborted"


@pytest.mark.parametrize(
    ("name", "accept", "media_type", "syntax"),
    [
        ("rgb_jpeg", OCTET, "application/octet-stream", EXPLICIT_LE),
        ("j2k_lossless", OCTET, "application/octet-stream", EXPLICIT_LE),
        ("jls", OCTET, "application/octet-stream", EXPLICIT_LE),
        ("mr_big", OCTET, "application/octet-stream", EXPLICIT_LE),
        ("dose_rle", OCTET, "application/octet-stream", EXPLICIT_LE),
        ("mr", 'multipart/related; type="image/jp2"', "image/jp2", J2K_LOSSLESS),
        ("mr", 'multipart/related; type="image/dicom-rle"', "image/dicom-rle", RLE),
        ("rgb_jpeg", 'multipart/related; type="image/jp2"', "image/jp2", J2K_LOSSLESS),
        ("jls", f"{OCTET}; transfer-syntax=*, multipart/related; type=image/dicom-rle; q=0.1",
         "application/octet-stream", "1.2.840.10008.1.2.4.80"),  # as stored
    ],
)
async def test_frames_in_the_asked_syntax(
    client: TestClient[Any, Any], name: str, accept: str, media_type: str, syntax: str
) -> None:
    original = _dataset(OBJECTS[name])
    count = int(original.get("NumberOfFrames", 1) or 1)
    numbers = [count, 1] if count > 1 else [1]
    url = f"/inst/{name}/frames/{','.join(map(str, numbers))}"
    content_type, parts = await get_parts(client, url, accept=accept)
    assert content_type.startswith(
        f'multipart/related; type="{media_type}"; transfer-syntax={syntax}; boundary='
    )
    expected = original.pixel_array if count == 1 else original.pixel_array[[n - 1 for n in numbers]]
    frames = [content for _, content in parts]
    for headers, _ in parts:
        assert headers["Content-Type"] == f"{media_type}; transfer-syntax={syntax}"
    if syntax == EXPLICIT_LE:
        dtype = expected.dtype.newbyteorder("<")
        for index, frame in enumerate(frames):
            want = expected if count == 1 else expected[index]
            assert frame == want.astype(dtype).tobytes()
    elif syntax in (J2K_LOSSLESS, RLE):
        # Each part is one compressed frame; pydicom decodes it to the original pixels.
        header = _dataset(OBJECTS[name])
        ds = pydicom.Dataset()
        ds.update(header.group_dataset(0x0028))
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
        if str(ds.PhotometricInterpretation).startswith("YBR"):
            ds.PhotometricInterpretation = "RGB"  # decoded before encoding
            ds.PlanarConfiguration = 0
        ds.NumberOfFrames = 1
        ds.PixelData = pydicom.encaps.encapsulate([frames[0]])
        ds["PixelData"].VR = "OB"
        assert np.array_equal(ds.pixel_array, expected if count == 1 else expected[0])
    else:
        assert frames == [_pixel_frames(OBJECTS[name])[n - 1] for n in numbers]


async def test_frames_oversize_is_406(client: TestClient[Any, Any]) -> None:
    async with client.get("/inst/mr_rle/frames/1?max=4096", headers={"Accept": OCTET}) as r:
        assert r.status == 406
        assert "configured maximum" in (await r.json())["message"]


async def test_transcoding_runs_off_the_event_loop(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold the (real) transcoder in its worker thread; the loop must go on serving.
    release = threading.Event()
    entered = threading.Event()
    real = retrieve.transcode_instance

    def held(data: bytes, target: str, *, max_bytes: int, max_inflated: int) -> bytes:
        entered.set()
        release.wait(timeout=30)
        return real(data, target, max_bytes=max_bytes, max_inflated=max_inflated)

    monkeypatch.setattr(retrieve, "transcode_instance", held)
    slow = asyncio.ensure_future(client.get("/instances?names=mr_rle", headers={"Accept": DICOM}))
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        _, parts = await get_parts(client, "/instances?names=ct", accept=DICOM)  # as stored
        assert parts[0][1] == OBJECTS["ct"]
        assert not slow.done()
    finally:
        release.set()
    async with await slow as response:
        assert response.status == 200
        body = await response.read()
    [(headers, content)] = split_multipart(body, _boundary(response.headers["Content-Type"]))
    assert _part_syntax(headers) == EXPLICIT_LE
    assert np.array_equal(_dataset(content).pixel_array, _dataset(OBJECTS["mr_rle"]).pixel_array)
