"""The response-head parser of the S3 adapter's zero-copy GET (``S3Store.open_body``)."""

from __future__ import annotations

import pytest

from imaging_gateway.storage.s3 import _parse_head


def test_parse_head_reads_status_and_fields() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 525938\r\nETag: \"abc\"\r\n"
        b"Connection: keep-alive\r\nX-Empty:\r\n\r\n"
    )
    version, status, fields = _parse_head(head)
    assert (version, status) == ("HTTP/1.1", 200)
    assert fields == {
        "content-length": "525938",
        "etag": '"abc"',
        "connection": "keep-alive",
        "x-empty": "",
    }


@pytest.mark.parametrize(
    "head",
    [b"garbage\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"],
)
def test_parse_head_refuses_what_is_not_a_response(head: bytes) -> None:
    with pytest.raises(ValueError):
        _parse_head(head)
