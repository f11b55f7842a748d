"""WADO-RS transcoding over a real gateway process, with the real dicomweb-client library."""

from __future__ import annotations

import asyncio
import copy
import io
from pathlib import Path

import aiohttp
import numpy as np
import pydicom
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import JPEG2000Lossless

from tests.e2e.conftest import Province
from tests.e2e.test_dicomweb import parts
from tests.support.gateway import cli

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _compress_one_stored_instance(province: Province, tmp_path: Path) -> pydicom.Dataset:
    """Replace one stored object of a hospital's study by its JPEG 2000 Lossless form, resync."""
    _, home, _ = province.shared_patient()
    study = sorted(province.studies(hospital=home))[0]
    one = next(i for i in province.corpus if i.study_uid == study)
    original = pydicom.dcmread(io.BytesIO(one.data))
    if original.Rows < 64 or original.Columns < 64:
        # OpenJPEG's default 6 resolutions need at least 32 pixels a side: tile it up.
        reps = (-(-64 // original.Rows), -(-64 // original.Columns))
        pixels = np.tile(original.pixel_array, reps)
        original.Rows, original.Columns = pixels.shape
        original.PixelData = pixels.tobytes()
    compressed = copy.deepcopy(original)
    compressed.compress(JPEG2000Lossless, generate_instance_uid=False)
    buffer = io.BytesIO()
    compressed.save_as(buffer, enforce_file_format=True)
    (tmp_path / "store" / one.key).write_bytes(buffer.getvalue())
    cli(province.gw.config, "sync", "--store", "bj-fs", "--no-progress")
    return original


async def test_real_client_decodes_a_compressed_instance(
    province: Province, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    original = _compress_one_stored_instance(province, tmp_path)
    _, home, _ = province.shared_patient()
    headers = province.hospital(home)
    client = DICOMwebClient(url=f"{province.gw.base}/dicomweb", headers=headers)
    uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)

    # dicomweb-client's default (transfer-syntax=*): as stored, and it decodes the pixels.
    stored = await asyncio.to_thread(client.retrieve_instance, *uids)
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(stored.pixel_array, original.pixel_array)

    # Explicit VR Little Endian asked for: decoded by the gateway.
    explicit = await asyncio.to_thread(
        client.retrieve_instance, *uids, media_types=(("application/dicom", EXPLICIT_LE),)
    )
    assert explicit.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert explicit.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(explicit.pixel_array, original.pixel_array)

    # Uncompressed frames from the compressed instance.
    frames = await asyncio.to_thread(
        client.retrieve_instance_frames, *uids, [1],
        media_types=(("application/octet-stream", EXPLICIT_LE),),
    )
    assert frames == [original.pixel_array.astype("<i2" if original.PixelRepresentation
                                                   else "<u2").tobytes()]

    # A plain PACS Accept (no transfer-syntax: Explicit VR LE, PS3.18 8.7.3.5) for the
    # whole study: every part decodable without a JPEG 2000 codec.
    url = f"{province.gw.base}/dicomweb/studies/{original.StudyInstanceUID}"
    accept = {**headers, "Accept": 'multipart/related; type="application/dicom"'}
    async with http.get(url, headers=accept) as response:
        assert response.status == 200, await response.text()
        body, content_type = await response.read(), response.headers["Content-Type"]
    assert f"transfer-syntax={EXPLICIT_LE}" in content_type
    datasets = [pydicom.dcmread(io.BytesIO(p)) for p in parts(body, content_type)]
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {EXPLICIT_LE}
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    assert np.array_equal(by_uid[original.SOPInstanceUID].pixel_array, original.pixel_array)
