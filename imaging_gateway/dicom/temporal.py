"""DA and TM values as stored (DICOM, or the ACR-NEMA forms readers accept) -> DICOM form."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any

__all__ = ["normalize_date", "normalize_dicom_json", "normalize_time"]

# PS3.5 6.2 DA: YYYYMMDD; for ACR-NEMA 300 compatibility readers also accept YYYY.MM.DD.
_DATE_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})|([0-9]{4})\.([0-9]{2})\.([0-9]{2})")
# PS3.5 6.2 TM: HH[MM[SS[.F{1,6}]]]; ACR-NEMA 300 wrote HH[:MM[:SS[.F{1,6}]]].
_TIME_RE = re.compile(
    r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?"
    r"|([0-9]{2})(?::([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,6}))?)?)?"
)


def normalize_date(text: str) -> str | None:
    """``text`` (padding stripped) as a DICOM date ``YYYYMMDD``; None unless it is a
    calendar date in the DICOM or the ACR-NEMA form (``19930822``, ``1993.08.22``)."""
    match = _DATE_RE.fullmatch(text)
    if match is None:
        return None
    year, month, day = (g for g in match.groups() if g is not None)
    try:
        datetime.date(int(year), int(month), int(day))
    except ValueError:
        return None
    return f"{year}{month}{day}"


def normalize_time(text: str) -> str | None:
    """``text`` (padding stripped) as a DICOM time ``HH[MM[SS[.F{1,6}]]]``, with the
    precision it was given in; None unless it is a time of day in the DICOM or the
    ACR-NEMA form (``070907.0705``, ``07:09:07.0705``). Seconds may be 60 (PS3.5 6.2:
    a leap second)."""
    match = _TIME_RE.fullmatch(text)
    if match is None:
        return None
    groups = match.groups()
    hours, minutes, seconds, fraction = groups[:4] if groups[0] is not None else groups[4:]
    if int(hours) > 23 or (minutes is not None and int(minutes) > 59):
        return None
    if seconds is not None and int(seconds) > 60:
        return None
    out = hours + (minutes or "") + (seconds or "")
    return f"{out}.{fraction}" if fraction is not None else out


def normalize_dicom_json(dataset: dict[str, Any]) -> None:
    """Rewrite, in place, the DA and TM values of a DICOM JSON dataset (PS3.18 F.2),
    sequence items included, in the DICOM form; a value neither form reads stays as it is
    (nothing of the object is dropped)."""
    for element in dataset.values():
        if not isinstance(element, dict):
            continue
        values = element.get("Value")
        if not isinstance(values, list):
            continue
        vr = element.get("vr")
        if vr == "SQ":
            for item in values:
                if isinstance(item, dict):
                    normalize_dicom_json(item)
            continue
        normalize = _NORMALIZE.get(vr) if isinstance(vr, str) else None
        if normalize is not None:
            element["Value"] = [
                (normalize(v.strip(" ")) or v) if isinstance(v, str) else v for v in values
            ]


_NORMALIZE: dict[str, Callable[[str], str | None]] = {"DA": normalize_date, "TM": normalize_time}
