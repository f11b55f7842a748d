"""Free text shown to people: control and formatting characters refused, naming the field."""

from __future__ import annotations

import pytest

from imaging_gateway.domain.text import check_shown_text, shown_text_problem
from imaging_gateway.errors import InvalidRequest


@pytest.mark.parametrize(
    "ch",
    ["\x00", "\x1b", "\x7f", "\x85", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066",
     "\u2069", "\ufeff", "\u2028", "\u2029", "\ud800"],
)
def test_controls_and_format_characters_are_refused(ch: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_shown_text(f"voucher {ch}3301", "evidence")
    assert info.value.message.startswith("evidence: ")
    assert f"U+{ord(ch):04X}" in info.value.message and "3301" not in info.value.message


def test_ordinary_text_and_lines_where_allowed() -> None:
    text = "医保电子凭证 No.3301-77 (Zhāng Sān) — 已扫码"
    assert check_shown_text(text, "evidence") == text
    assert shown_text_problem("line one\nline two\r\n\tthree", multiline=True) is None
    assert shown_text_problem("line one\nline two") is not None
    assert shown_text_problem("a\u202eb", multiline=True) is not None
