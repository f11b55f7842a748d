"""Hostile request bytes against a served gateway (SQLite and PostgreSQL): whatever a
client writes, the answer arrives, is JSON or DICOM JSON, carries no raw input in a
header, and nothing of the request's content reaches the gateway's log."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest

from tests.e2e.conftest import Province
from tests.support import rawhttp

# Bytes a header may carry: visible ASCII, space, tab (RFC 9110 5.5; obs-text aside).
_HEADER_SAFE = re.compile(rb"[\t\x20-\x7e]*")
FAKE_ID = "110101199003077777"  # a well-formed fake national ID (GB 11643)
FAKE_TOKEN = "eyFAKEBEARERTOKENSTARTabcdef"


@pytest.fixture(scope="module")
def province(module_province: Province) -> Province:
    """These tests only read: one gateway per backend serves the whole module."""
    return module_province


def _assert_clean_head(resp: rawhttp.RawResponse) -> None:
    for line in resp.head.split(b"\r\n"):
        assert _HEADER_SAFE.fullmatch(line), line


async def test_unknown_parameter_names_are_never_echoed_raw_into_a_header(
    province: Province,
) -> None:
    _, home, _ = province.shared_patient()
    auth = province.hospital(home)
    port = province.gw.port
    # (raw name, as the Warning header names it)
    names = [("a\rb", "a%0Db"), ("a\nb", "a%0Ab"), ("a\x01b", "a%01b"), ("a\x7fb", "a%7Fb"),
             ('a"b\\c', "a'b%5Cc"), ("a患者", "a%E6%82%A3%E8%80%85"), ("a%b", "a%25b")]
    for name, shown in names:
        path = f"/dicomweb/studies?{quote(name, safe='')}=1&limit=1"
        resp = await rawhttp.exchange(port, rawhttp.get(path, port=port, headers=auth))
        assert resp is not None, f"no answer at all for {name!r}"
        assert resp.status == 200, (name, resp.status, resp.body[:300])
        _assert_clean_head(resp)
        warning = resp.header("Warning")
        assert warning is not None and warning.startswith("299 "), resp.head
        # The name is named (percent-encoded as it was sent), never raw.
        assert f"The query parameter {shown} is not supported" in warning, (name, warning)
        assert len(json.loads(resp.body)) == 1
    # An attribute-like name with a control character: a JSON 4xx or an ignored key,
    # never a header carrying it.
    path = "/dicomweb/studies?Patient%0dID=1&limit=1"
    resp = await rawhttp.exchange(port, rawhttp.get(path, port=port, headers=auth))
    assert resp is not None
    _assert_clean_head(resp)
    assert resp.status in (200, 400), resp.head
    if resp.status == 400:
        assert json.loads(resp.body)["error"] == "invalid-query"
    else:
        assert "Patient%0DID" in (resp.header("Warning") or "")
    assert "Traceback" not in province.gw.logs()


async def test_oversized_request_line_and_header_answer_json_and_log_no_content(
    province: Province,
) -> None:
    _, home, _ = province.shared_patient()
    auth = province.hospital(home)
    port = province.gw.port
    pad = "A" * 9000
    line = "the request line (the URL) is longer than 8190 bytes"
    header = "a request header field is longer than 8190 bytes"
    cases = [
        # request line over 8190 bytes, the identifier in its first hundred bytes
        (rawhttp.get(f"/dicomweb/studies?PatientID={FAKE_ID}&x={pad}", port=port, headers=auth),
         "request-too-large", line),
        (rawhttp.get(f"/consents?patient={FAKE_ID}&x={pad}", port=port, headers=auth),
         "request-too-large", line),
        # one header over 8190 bytes: a bearer token, a custom header with the ID
        (rawhttp.get("/dicomweb/studies", port=port,
                     headers={"Authorization": f"Bearer {FAKE_TOKEN}{pad}"}),
         "request-too-large", header),
        (rawhttp.get("/dicomweb/studies", port=port,
                     headers={**auth, "X-Patient": f"{FAKE_ID}{pad}"}),
         "request-too-large", header),
        # other parser errors quote the bytes too: a control character in a header
        (rawhttp.get("/dicomweb/studies", port=port,
                     headers={**auth, "X-Patient": f"{FAKE_ID}\x01"}),
         "bad-request", "the request is not valid HTTP/1.1"),
    ]
    for request, code, message in cases:
        resp = await rawhttp.exchange(port, request)
        assert resp is not None
        assert resp.status == 400, resp.head
        _assert_clean_head(resp)
        assert (resp.header("Content-Type") or "").startswith("application/json"), resp.head
        body = json.loads(resp.body)
        assert set(body) == {"error", "message"}, body
        assert body["error"] == code and body["message"].startswith(message), body
        text = resp.body.decode()
        assert FAKE_ID not in text and FAKE_TOKEN not in text and "AAAA" not in text, text
    # An ordinary search by PatientID is logged without its query string either, nor is
    # an identifier in a path (an encoded "?" makes the query part of the path).
    ok = rawhttp.get(f"/dicomweb/studies?PatientID={FAKE_ID}", port=port, headers=auth)
    resp = await rawhttp.exchange(port, ok)
    assert resp is not None and resp.status in (200, 204)
    for path in (f"/dicomweb/studies%3FPatientID%3D{FAKE_ID}", f"/{FAKE_ID}",
                 f"/dicomweb/studies/{FAKE_ID}",
                 f"/dicomweb/studies/1.2/series/1.3/instances/1.4/bulkdata/{FAKE_ID}"):
        resp = await rawhttp.exchange(port, rawhttp.get(path, port=port, headers=auth))
        assert resp is not None and resp.status == 404, resp
        assert FAKE_ID not in resp.body.decode()
    logs = province.gw.logs()
    assert FAKE_ID not in logs
    assert FAKE_TOKEN not in logs
    assert "AAAAAAAA" not in logs
    assert "Traceback" not in logs
    # ... while the access log still names what was asked for, UIDs included.
    assert '"GET /dicomweb/studies/1.2/series/1.3/instances/1.4/bulkdata/{path}" 404' in logs
