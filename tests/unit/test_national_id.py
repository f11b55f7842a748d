"""GB 11643-1999 resident identity numbers: check character and validation."""

from __future__ import annotations

import datetime
import random

import pytest

from imaging_gateway.dicom.national_id import is_valid_resident_id, resident_id_check_char
from tests.factories import valid_resident_id

FULL_WIDTH = "".join(chr(ord(c) + 0xFEE0) for c in "11010519491231002X")


@pytest.mark.parametrize(
    ("number", "valid"),
    [
        ("11010519491231002X", True),  # the standard's worked example
        ("440524188001010014", True),  # GB 11643-1999 annex example
        ("11010519491231002x", False),  # the check character is an upper-case X
        ("110105194912310021", False),  # wrong check character
        ("11010519491231002", False),  # 17 characters
        ("11010519491231002X1", False),  # 19 characters
        ("1101051949123100AX", False),  # letters in the first 17
        (FULL_WIDTH, False),  # full-width digits
        ("", False),
    ],
)
def test_known_numbers(number: str, valid: bool) -> None:
    assert is_valid_resident_id(number) is valid


def test_check_character_covers_every_remainder() -> None:
    seen: set[str] = set()
    for sequence in range(1, 400):
        first17 = f"440106{19800229}{sequence:03d}"
        check = resident_id_check_char(first17)
        seen.add(check)
        assert is_valid_resident_id(first17 + check)
    assert seen == set("0123456789X")


@pytest.mark.parametrize(
    "birth",
    ["19990230", "20230229", "19491300", "19490000", "18491231", "99991231"],
)
def test_birth_date_must_be_a_real_past_date(birth: str) -> None:
    first17 = f"110105{birth}002"
    assert not is_valid_resident_id(first17 + resident_id_check_char(first17))


def test_future_birth_date_is_invalid() -> None:
    tomorrow = datetime.date.today() + datetime.timedelta(days=1)
    first17 = f"110105{tomorrow:%Y%m%d}002"
    assert not is_valid_resident_id(first17 + resident_id_check_char(first17))


def test_every_single_character_error_is_detected() -> None:
    # ISO 7064 MOD 11-2 detects all single substitution errors.
    number = valid_resident_id()
    for position in range(18):
        for replacement in "0123456789X":
            if replacement == number[position] or (replacement == "X" and position < 17):
                continue
            changed = number[:position] + replacement + number[position + 1 :]
            assert not is_valid_resident_id(changed), changed


def test_adjacent_transpositions_are_detected() -> None:
    rng = random.Random(7)
    for _ in range(200):
        birth = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(20000))
        number = valid_resident_id(f"{rng.randrange(110000, 660000)}", f"{birth:%Y%m%d}", "001")
        for position in range(16):
            if number[position] == number[position + 1]:
                continue
            swapped = (
                number[:position] + number[position + 1] + number[position] + number[position + 2 :]
            )
            assert not is_valid_resident_id(swapped)


@pytest.mark.parametrize("bad", ["1234567890123456", "123456789012345678", "1101051949123100A", ""])
def test_check_char_rejects_malformed_input(bad: str) -> None:
    with pytest.raises(ValueError):
        resident_id_check_char(bad)
