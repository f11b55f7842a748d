"""GB 11643-1999 citizen identity numbers: the ISO 7064 MOD 11-2 check character and validation."""

from __future__ import annotations

import datetime

# GB 11643-1999 section 5: weights W_i = 2^(i-1) mod 11 for positions 18..2 (left to right),
# check character from (12 - (sum mod 11)) mod 11, written 'X' for 10 (ISO 7064 MOD 11-2).
_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_CHARS = "10X98765432"
_EARLIEST_BIRTH_YEAR = 1850


def resident_id_check_char(first17: str) -> str:
    """Return the check character ('0'-'9' or 'X') for the first 17 digits of an ID number.

    Raises ``ValueError`` if ``first17`` is not exactly 17 ASCII digits.
    """
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError("expected exactly 17 ASCII digits")
    total = sum(int(digit) * weight for digit, weight in zip(first17, _WEIGHTS, strict=True))
    return _CHECK_CHARS[total % 11]


def is_valid_resident_id(value: str) -> bool:
    """Whether ``value`` is a well-formed 18-character GB 11643 resident identity number.

    Checks the shape (17 digits then a digit or an upper-case 'X'), that characters 7-14
    are a real calendar date (YYYYMMDD, not before 1850 and not in the future) and the
    MOD 11-2 check character. The region code is not checked against GB/T 2260, so that
    numbers of newer schemes (residence permits) are not rejected. Never raises.
    """
    if len(value) != 18 or not value.isascii():
        return False
    first17, check = value[:17], value[17]
    if not first17.isdigit() or not (check.isdigit() or check == "X"):
        return False
    try:
        birth = datetime.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if birth.year < _EARLIEST_BIRTH_YEAR or birth > datetime.date.today():
        return False
    return resident_id_check_char(first17) == check
