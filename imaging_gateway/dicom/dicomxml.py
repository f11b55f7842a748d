"""DICOM JSON objects (PS3.18 F.2) -> PS3.19 Annex A Native DICOM Model XML documents.

A pure converter: it takes the very objects the JSON responses send (see
``imaging_gateway.dicom.dicomjson`` and ``services.retrieve.retrieve_metadata``) and writes
the same information as ``application/dicom+xml`` with ``xml.etree.ElementTree`` (which
escapes ``&``, ``<``, ``>`` and quotes). What it maps, per PS3.19 A.1.5:

* each ``"ggggeeee": {"vr": ..}`` -> ``<DicomAttribute tag vr keyword>``; group length
  elements (gggg,0000) are left out (A.1.1);
* private data elements (odd group, element xxee) -> ``tag="gggg00ee"`` plus
  ``privateCreator`` from the dataset's (gggg,00xx); the private creator elements
  themselves are not sent ("the block used in the DICOM encoding shall not be sent"). A
  private element whose creator is missing keeps its full tag and has no
  ``privateCreator``: nothing is dropped, and a reader sees it as unknown;
* ``Value`` -> ``<Value number="n">`` (1-based); a null inside a multi-valued attribute
  -> an empty ``<Value number="n"/>``; numbers as JSON wrote them;
* PN -> ``<PersonName number="n">`` with Alphabetic / Ideographic / Phonetic groups of
  FamilyName, GivenName, MiddleName, NamePrefix, NameSuffix (empty components left out,
  the positions of later ones kept by their element names);
* SQ -> ``<Item number="n">`` holding the item's attributes;
* ``BulkDataURI`` -> ``<BulkData uri=".."/>``; ``InlineBinary`` -> ``<InlineBinary>``
  with the same base64 text.

XML 1.0 cannot carry every code point (no C0 controls but TAB, LF, CR; no surrogates,
U+FFFE, U+FFFF), not even as character references. Such characters cannot be meaningful
in DICOM text (PS3.5 6.1.2 allows only ESC, TAB, LF, FF, CR, and ESC does not survive
decoding) and each is written as U+FFFD REPLACEMENT CHARACTER, so the document stays
well-formed and every other character is kept.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from pydicom.datadict import keyword_for_tag

from imaging_gateway.dicom.dicomjson import PN_GROUPS, Level, to_dicom_json

__all__ = [
    "NATIVE_DICOM_NS",
    "PN_COMPONENTS",
    "dataset_to_xml",
    "native_dicom_model",
    "to_dicom_xml",
    "xml_text",
]

NATIVE_DICOM_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_XML_NS = "http://www.w3.org/XML/1998/namespace"
# Everything outside XML 1.0's Char production (W3C XML 1.0, 2.2).
_ILLEGAL = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_VR = re.compile(r"^[A-Z]{2}$")


def xml_text(value: object) -> str:
    """``value`` as text XML 1.0 can hold: each illegal character becomes U+FFFD.

    Raises nothing.
    """
    return _ILLEGAL.sub("\ufffd", str(value))


def _private_creators(dataset: Mapping[str, Any]) -> dict[tuple[int, int], str]:
    """(group, block) -> private creator, from the dataset's (gggg,0010-00FF) elements."""
    creators: dict[tuple[int, int], str] = {}
    for key, element in dataset.items():
        tag = int(key, 16)
        group, elem = tag >> 16, tag & 0xFFFF
        if group % 2 == 1 and 0x10 <= elem <= 0xFF:
            values = element.get("Value") or []
            if values and isinstance(values[0], str) and values[0].strip():
                creators[(group, elem)] = values[0].strip()
    return creators


def _check(key: str, element: Any) -> str:
    if not isinstance(key, str) or not _TAG.match(key):
        raise ValueError(f"DICOM JSON: {key!r} is not a tag of 8 hexadecimal digits")
    if not isinstance(element, Mapping):
        raise ValueError(f"DICOM JSON: ({key[:4]},{key[4:]}) is not an object")
    vr = element.get("vr")
    if not isinstance(vr, str) or not _VR.match(vr):
        raise ValueError(f"DICOM JSON: ({key[:4]},{key[4:]}) has no valid vr")
    return vr


def _person_name(parent: ET.Element, number: int, value: Any) -> None:
    name = ET.SubElement(parent, "PersonName", number=str(number))
    if value is None:
        return
    if isinstance(value, str):  # tolerated: the PS3.5 form instead of the JSON object
        value = dict(zip(PN_GROUPS, value.split("="), strict=False))
    if not isinstance(value, Mapping):
        raise ValueError("DICOM JSON: a PN value is neither an object nor null")
    for group_name in PN_GROUPS:
        group = value.get(group_name)
        if not group:
            continue
        group_el = ET.SubElement(name, group_name)
        for comp_name, comp in zip(PN_COMPONENTS, str(group).split("^"), strict=False):
            if comp:
                ET.SubElement(group_el, comp_name).text = xml_text(comp)


def _fill(parent: ET.Element, dataset: Mapping[str, Any]) -> None:
    if not isinstance(dataset, Mapping):
        raise ValueError("DICOM JSON: a dataset or sequence item is not an object")
    vrs = {key: _check(key, element) for key, element in dataset.items()}
    creators = _private_creators(dataset)
    for key in sorted(dataset, key=lambda k: int(k, 16)):
        element, vr = dataset[key], vrs[key]
        tag = int(key, 16)
        group, elem = tag >> 16, tag & 0xFFFF
        if elem == 0:
            continue  # group length: not in a Native DICOM Model (A.1.1)
        attrs: dict[str, str] = {}
        if group % 2 == 1:
            if 0x10 <= elem <= 0xFF:
                continue  # a private creator: conveyed by privateCreator instead
            creator = creators.get((group, elem >> 8))
            if creator is not None:
                attrs["tag"] = f"{group:04X}00{elem & 0xFF:02X}"
                attrs["vr"] = vr
                attrs["privateCreator"] = xml_text(creator)
            else:
                attrs["tag"] = f"{tag:08X}"
                attrs["vr"] = vr
        else:
            keyword = keyword_for_tag(tag)
            if keyword:
                attrs["keyword"] = keyword
            attrs["tag"] = f"{tag:08X}"
            attrs["vr"] = vr
        attribute = ET.SubElement(parent, "DicomAttribute", attrs)
        if "BulkDataURI" in element:
            ET.SubElement(attribute, "BulkData", uri=xml_text(element["BulkDataURI"]))
            continue
        if "InlineBinary" in element:
            ET.SubElement(attribute, "InlineBinary").text = xml_text(element["InlineBinary"])
            continue
        values = element.get("Value") or []
        if not isinstance(values, list):
            raise ValueError(f"DICOM JSON: ({key[:4]},{key[4:]}) Value is not an array")
        for number, value in enumerate(values, start=1):
            if vr == "PN":
                _person_name(attribute, number, value)
            elif vr == "SQ":
                item = ET.SubElement(attribute, "Item", number=str(number))
                if value is not None:
                    _fill(item, value)
            else:
                v = ET.SubElement(attribute, "Value", number=str(number))
                if value is not None:
                    v.text = xml_text(value)


def native_dicom_model(dataset: Mapping[str, Any]) -> ET.Element:
    """The ``NativeDicomModel`` element of one DICOM JSON dataset (see the module docstring).

    Raises ``ValueError`` when ``dataset`` is not DICOM JSON (a key that is not 8 hex
    digits, an element without a two-letter ``vr``, a Value that is not an array).
    """
    root = ET.Element("NativeDicomModel", {"xmlns": NATIVE_DICOM_NS})
    # PS3.19 A.1.5: "The directive xml:space="preserve" shall be included."
    root.set(f"{{{_XML_NS}}}space", "preserve")
    _fill(root, dataset)
    return root


def dataset_to_xml(dataset: Mapping[str, Any]) -> bytes:
    """One DICOM JSON dataset as a PS3.19 Native DICOM Model document (UTF-8 bytes).

    Raises ``ValueError`` when ``dataset`` is not DICOM JSON (see :func:`native_dicom_model`).
    """
    body: str = ET.tostring(native_dicom_model(dataset), encoding="unicode")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body.encode("utf-8")


def to_dicom_xml(
    level: Level,
    rows: Iterable[Mapping[str, Any]],
    *,
    includefield: Collection[str],
    retrieve_base: str,
) -> list[bytes]:
    """Search results as ``application/dicom+xml`` documents, one per result.

    PS3.18 8.7.3.2 / 10.6.3.3: XML search results travel as ``multipart/related;
    type="application/dicom+xml"``, one Native DICOM Model part per match; the handler
    frames the parts. Same attributes as :func:`~imaging_gateway.dicom.dicomjson.to_dicom_json`.
    Raises ``KeyError`` for a keyword that is not in the DICOM data dictionary.
    """
    datasets = to_dicom_json(level, rows, includefield=includefield, retrieve_base=retrieve_base)
    return [dataset_to_xml(ds) for ds in datasets]
