"""A reader of PS3.19 Native DICOM Model documents back into DICOM JSON, for round trips.

Written from PS3.19 A.1.5 independently of ``imaging_gateway.dicom.dicomxml``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from imaging_gateway.dicom.dicomxml import NATIVE_DICOM_NS, PN_COMPONENTS

NS = {"n": NATIVE_DICOM_NS}
XML_NS = "{http://www.w3.org/XML/1998/namespace}"
_INTS = {"IS", "SL", "SS", "UL", "US", "SV", "UV"}
_FLOATS = {"DS", "FL", "FD"}


def read_back(doc: bytes) -> dict[str, Any]:
    """The DICOM JSON an independent reader gets from a Native DICOM Model document.

    Private blocks are allocated from 0x10 upwards per group, in order of first use,
    which is how the writers of the test files allocated them.
    """
    root = ET.fromstring(doc)
    assert root.tag == f"{{{NATIVE_DICOM_NS}}}NativeDicomModel"
    assert root.get(f"{XML_NS}space") == "preserve"
    return _read_dataset(root)


def _read_dataset(parent: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    blocks: dict[tuple[int, str], int] = {}
    for attr in parent.findall("n:DicomAttribute", NS):
        tag, vr = attr.get("tag"), attr.get("vr")
        assert tag is not None and vr is not None and len(tag) == 8 and tag == tag.upper()
        creator = attr.get("privateCreator")
        if creator is not None:
            group = int(tag[:4], 16)
            assert group % 2 == 1 and tag[4:6] == "00"
            block = blocks.get((group, creator))
            if block is None:
                block = 0x10 + sum(1 for g, _ in blocks if g == group)
                blocks[(group, creator)] = block
                out[f"{group:04X}{block:04X}"] = {"vr": "LO", "Value": [creator]}
            tag = f"{group:04X}{block:02X}{tag[6:]}"
        element: dict[str, Any] = {"vr": vr}
        children = list(attr)
        numbers = [int(c.get("number", "0")) for c in children if c.get("number")]
        assert numbers == list(range(1, len(numbers) + 1)), tag
        bulk = attr.find("n:BulkData", NS)
        inline = attr.find("n:InlineBinary", NS)
        if bulk is not None:
            element["BulkDataURI"] = bulk.get("uri")
        elif inline is not None:
            element["InlineBinary"] = inline.text or ""
        elif vr == "PN":
            element["Value"] = [_read_name(pn) for pn in attr.findall("n:PersonName", NS)]
        elif vr == "SQ":
            element["Value"] = [_read_dataset(item) for item in attr.findall("n:Item", NS)]
        else:
            element["Value"] = [_read_value(vr, v.text) for v in attr.findall("n:Value", NS)]
        if element.get("Value") == []:
            del element["Value"]
        out[tag] = element
    return dict(sorted(out.items()))


def _read_name(pn: ET.Element) -> dict[str, str] | None:
    name: dict[str, str] = {}
    for group in pn:
        comps = {c.tag.split("}")[1]: c.text or "" for c in group}
        parts = [comps.get(c, "") for c in PN_COMPONENTS]
        while parts and not parts[-1]:
            parts.pop()
        name[group.tag.split("}")[1]] = "^".join(parts)
    return name or None


def _read_value(vr: str, text: str | None) -> Any:
    if text is None:
        return None
    if vr in _INTS:
        return int(text)
    if vr in _FLOATS:
        return float(text)
    return text


def normalised(js: dict[str, Any]) -> dict[str, Any]:
    """``js`` as the reader gives it back: group lengths gone, empty Values gone, floats."""
    out: dict[str, Any] = {}
    for tag, element in js.items():
        if tag.endswith("0000"):
            continue
        element = dict(element)
        values = element.get("Value")
        if values == []:
            del element["Value"]
        elif values is not None and element["vr"] == "SQ":
            element["Value"] = [normalised(item) for item in values]
        elif values is not None and element["vr"] in _FLOATS:
            element["Value"] = [None if v is None else float(v) for v in values]
        elif values is not None:  # an empty value of several: "" in JSON, <Value/> in XML
            element["Value"] = [None if v == "" or v == {} else v for v in values]
        out[tag] = element
    return dict(sorted(out.items()))
