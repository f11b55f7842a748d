"""parse_header's fast Explicit VR Little Endian walk gives exactly what the pydicom path gives."""

from __future__ import annotations

import random
from pathlib import Path
from unittest import mock

import pytest

from imaging_gateway.dicom import headers
from imaging_gateway.dicom.headers import NeedMoreData, NotParseable, parse_header
from tests.factories import (
    PYDICOM_DATA,
    dataset_bytes,
    make_instance_bytes,
    minimal_dataset,
    undefined_lengths,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

Outcome = tuple[str, object]


def outcome(data: bytes, *, complete: bool, fast: bool) -> Outcome:
    """What parsing gives: the header, the size asked for, or the reason for refusal."""
    try:
        if fast:
            return ("header", parse_header(data, complete=complete))
        with mock.patch.object(headers, "_read_explicit_le", return_value=None):
            return ("header", parse_header(data, complete=complete))
    except NeedMoreData as more:
        return ("more", more.at_least)
    except NotParseable as refused:
        return ("refused", refused.reason)


def assert_same(data: bytes, *, complete: bool) -> None:
    assert outcome(data, complete=complete, fast=True) == outcome(
        data, complete=complete, fast=False
    ), (len(data), complete)


def takes_fast_path(data: bytes, *, complete: bool) -> bool:
    issuers = headers.DEFAULT_NATIONAL_ID_ISSUERS
    try:
        return headers._read_explicit_le(data, complete=complete, issuers=issuers) is not None
    except NotParseable:
        return True  # the walk succeeded; the records refused the object, as pydicom's would


PYDICOM_FILES = sorted(
    str(path.relative_to(PYDICOM_DATA))
    for folder in ("test_files", "charset_files")
    for path in (PYDICOM_DATA / folder).iterdir()
    if path.is_file() and path.stat().st_size < 4_000_000 and path.suffix not in {".py", ".txt"}
)


@pytest.mark.parametrize("name", PYDICOM_FILES)
def test_pydicom_files_whole_and_cut(name: str) -> None:
    raw = (PYDICOM_DATA / name).read_bytes()
    assert_same(raw, complete=True)
    for cut in {64, 132, 200, 1024, 4096, 65536}:
        if cut < len(raw):
            assert_same(raw[:cut], complete=False)
            assert_same(raw[:cut], complete=True)


def test_the_fast_path_is_taken_for_most_explicit_le_files() -> None:
    """A check that the walk is not vacuous: pydicom's plain Explicit VR LE files use it."""
    taken = [
        name
        for name in (
            "test_files/CT_small.dcm",
            "test_files/JPEG2000.dcm",
            "test_files/MR_small.dcm",
        )
        if takes_fast_path((PYDICOM_DATA / name).read_bytes(), complete=True)
    ]
    assert taken == [
        "test_files/CT_small.dcm",
        "test_files/JPEG2000.dcm",
        "test_files/MR_small.dcm",
    ]
    # Not for what it does not vouch for: implicit VR, big endian, deflated.
    for name in (
        "test_files/rtplan.dcm",
        "test_files/MR_small_bigendian.dcm",
        "test_files/image_dfl.dcm",
    ):
        assert not takes_fast_path((PYDICOM_DATA / name).read_bytes(), complete=True), name


# (instance, prefix step): every prefix of two, every third of the others.
SYNTHETIC = {
    "CT GB18030": ({"modality": "CT", "charset": "GB18030"}, 1),
    "MR ISO 2022 IR 58": ({"modality": "MR", "charset": "ISO 2022 IR 58"}, 1),
    "DX ISO_IR 192": ({"modality": "DX", "charset": "ISO_IR 192"}, 3),
    "CT GBK": ({"modality": "CT", "charset": "GBK"}, 3),
}


@pytest.mark.parametrize("case", SYNTHETIC)
def test_synthetic_instances_every_prefix(case: str) -> None:
    kwargs, step = SYNTHETIC[case]
    raw = make_instance_bytes(**kwargs)
    assert takes_fast_path(raw, complete=True)
    header = parse_header(raw, complete=True)
    for cut in range(0, header.header_bytes + 40, step):
        assert_same(raw[:cut], complete=False)
        assert_same(raw[:cut], complete=True)


def test_undefined_length_sequences_every_prefix() -> None:
    raw = dataset_bytes(undefined_lengths(minimal_dataset()))
    assert takes_fast_path(raw, complete=True)
    for cut in range(0, len(raw) + 1):
        assert_same(raw[:cut], complete=cut == len(raw))
        assert_same(raw[:cut], complete=True)


@pytest.mark.parametrize("seed", range(6))
def test_corrupted_bytes_give_the_same_outcome(seed: int) -> None:
    """Bytes flipped anywhere in the header: both paths agree (header, refusal or more)."""
    rng = random.Random(seed)
    base = make_instance_bytes(charset="GB18030")
    if seed % 2:
        base = dataset_bytes(undefined_lengths(minimal_dataset()))
    end = parse_header(base, complete=True).header_bytes + 12
    for _ in range(250):
        raw = bytearray(base)
        for _ in range(rng.choice((1, 1, 2, 4))):
            raw[rng.randrange(128, end)] = rng.choice((0, 0xFF, rng.randrange(256)))
        assert_same(bytes(raw[:65536]), complete=False)
        assert_same(bytes(raw), complete=True)


def test_files_are_found() -> None:
    assert len(PYDICOM_FILES) > 80
    assert Path(PYDICOM_DATA / PYDICOM_FILES[0]).is_file()
