"""Bounded inflation of deflated objects: the same datasets as pydicom, never past the bound."""

from __future__ import annotations

import io
import tracemalloc

import pydicom
import pytest

from imaging_gateway.dicom.deflate import InflateLimitExceeded, inflate, read_part10
from imaging_gateway.dicom.headers import NotParseable, parse_header
from tests.factories import deflated_bomb, make_instance, pydicom_file


@pytest.mark.parametrize("name", ["image_dfl.dcm", "CT_small.dcm", "MR_small_bigendian.dcm"])
@pytest.mark.parametrize("stop_before_pixels", [False, True])
def test_read_part10_reads_as_pydicom_does(name: str, stop_before_pixels: bool) -> None:
    data = pydicom_file(name)
    expected = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    got = read_part10(data, max_inflated=1 << 26, stop_before_pixels=stop_before_pixels)
    assert got == expected
    assert got.file_meta == expected.file_meta
    assert got.original_encoding == expected.original_encoding


def test_a_bomb_is_refused_holding_far_less_than_the_bound() -> None:
    bomb = deflated_bomb(make_instance().data, inflated=256 << 20, where="trailer")
    meta_end = 132 + 12 + int.from_bytes(bomb[140:144], "little")  # (0002,0000) + group
    stream = bomb[meta_end:]
    tracemalloc.start()
    try:
        with pytest.raises(InflateLimitExceeded):
            read_part10(bomb, max_inflated=64 << 20)
        with pytest.raises(InflateLimitExceeded):
            inflate(stream, max_bytes=64 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_a_header_bomb_is_header_too_large_from_any_prefix() -> None:
    bomb = deflated_bomb(make_instance().data, inflated=64 << 20, where="header")
    for size, complete in ((65536, False), (len(bomb), True)):
        with pytest.raises(NotParseable) as info:
            parse_header(bomb[:size], complete=complete, max_inflated_bytes=1 << 20)
        assert info.value.reason.startswith("header-too-large: "), info.value.reason
