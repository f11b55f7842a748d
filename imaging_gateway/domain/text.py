"""Free text a caller sends that people will read (consent evidence, reasons): what it may hold."""

from __future__ import annotations

import unicodedata
from typing import Final

from imaging_gateway.errors import InvalidRequest

__all__ = ["check_shown_text", "shown_text_problem"]

# Unicode general categories refused: Cc (C0 and C1 controls, DEL: NUL cannot even be
# stored in a PostgreSQL text column), Cf (format characters: the bidirectional
# overrides, embeddings and isolates U+202A-U+202E, U+2066-U+2069, the marks U+200E/F,
# zero-width characters), Cs (lone surrogates: not encodable as UTF-8), Zl and Zp (line
# and paragraph separators). Any of them can make the text shown differ from the text
# stored (UTS #39 and CVE-2021-42574 "Trojan Source" describe the bidi ones).
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_LINE_BREAKS: Final = frozenset("\t\n\r")


def shown_text_problem(value: str, *, multiline: bool = False) -> str | None:
    """Why ``value`` may not be shown as it is (a control or format character), or None.

    With ``multiline`` tab, line feed and carriage return are allowed. The reason gives
    the code point, never the text.
    """
    for ch in value:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES and not (
            multiline and ch in _LINE_BREAKS
        ):
            return (
                "control and formatting characters are not allowed "
                f"(U+{ord(ch):04X} {unicodedata.name(ch, 'control')})"
            )
    return None


def check_shown_text(value: str, name: str, *, multiline: bool = False) -> str:
    """``value`` unchanged if ``shown_text_problem`` finds nothing; else ``InvalidRequest``.

    ``name`` is the parameter the message names.
    """
    problem = shown_text_problem(value, multiline=multiline)
    if problem is not None:
        raise InvalidRequest(f"{name}: {problem}")
    return value
