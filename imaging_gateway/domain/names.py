"""Person-name search keys: normalized PN groups, characters, pinyin and initials for matching.

PS3.4 C.2.2.2.1.1 lets literal Person Name matching be insensitive to case and to the
position of the ideographic and phonetic component groups, and C.2.2.2.1.4 leaves the
semantics of fuzzy matching to the implementation. This gateway's semantics:

Keys of one stored name (``name_search_keys``), all NFKC-normalized and case-folded:

- one *group key* per non-empty component group (alphabetic, ideographic, phonetic):
  ``=`` followed by the group's components joined by ``^``, trailing empty components
  dropped, white space removed (``Wang^XiaoDong=王^小东`` gives ``=wang^xiaodong`` and
  ``=王^小东``). Literal matching (single value and ``*``/``?`` wildcards) compares a
  query group with these keys, so ``Wang^XiaoDong``, ``wang^xiaodong`` and ``王^小东``
  all match literally; a query with several groups needs each of them to match a group.
- *fuzzy tokens* (no ``=``), accents and pinyin tone marks stripped: each word of each
  component and the words split at camel case (``XiaoDong`` gives ``xiao``, ``dong``);
  each component run together and the whole name run together (``xiaodong``,
  ``wangxiaodong``); every Han character and every Han component (``王``, ``小``,
  ``小东``, ``王小东``); the pinyin of the Han text, per syllable (every reading of a
  surname's characters, the usual reading otherwise), per component and whole
  (``wang``, ``xiaodong``, ``wangxiaodong``); ``ü`` also as ``v`` (``lü``: ``lu``,
  ``lv``); and the initials of the pinyin and of the camel-case alphabetic words
  (``wxd``, ``xd``).

A fuzzy query (``fuzzy_terms``) is folded the same way, tone numbers (``zhang1``) and
marks (``zhāng``) removed, and split into terms at white space and PN delimiters; a
stored name matches when *every* term is a prefix of one of its tokens. So 张三 is found
by ``张三``, ``张``, ``三``, ``zhang san``, ``zhangsan``, ``zhāng sān``, ``zhang1 san1``,
``zs``, ``Zhang^San`` and ``zha``.

Index-friendly: tokens and group keys live one per row in ``patient_name_keys``; every
term and every literal group is an equality or a prefix range on that indexed column.
Not index-friendly: a literal wildcard pattern that starts with ``*`` or ``?`` scans the
group keys. Not covered: traditional/simplified variants, homophones written with other
characters, edit-distance typos, and syllable splitting of alphabetic-only names written
without case or spaces (``xiaodong`` stored as ``XIAODONG`` is not found by ``xiao dong``
but is by ``xiaodong``).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable

# pypinyin reads these at import: without them it loads (and copies) a phrase dictionary
# of ~40 MiB into every gateway and sync process. Names are read character by character
# (surnames with every reading), which the phrase dictionary does not change here
# (tests/unit/test_names.py).
os.environ.setdefault("PYPINYIN_NO_PHRASES", "true")
os.environ.setdefault("PYPINYIN_NO_DICT_COPY", "true")

from pypinyin import Style, lazy_pinyin, pinyin

__all__ = [
    "GROUP_MARK",
    "fuzzy_terms",
    "group_key",
    "group_pattern",
    "name_search_keys",
    "split_keys",
]

GROUP_MARK = "="
"""First character of a group key; fuzzy tokens never contain it."""
_SEPARATOR = " "
_MAX_KEY = 128
"""Longer keys are cut (the key column is 128 characters wide)."""
_WORD_SPLIT = re.compile(r"[\s,.'\u2019\-_/·•()]+")
_CAMEL = re.compile(r"[A-Z]?[a-z\u00df-\u024f]+|[A-Z]+(?![a-z])|\d+")
_TONE_NUMBER = re.compile(r"(?<=[a-zü])[1-5]")
_QUERY_SPLIT = re.compile(r"[\s\^=,.'\u2019\-_/·•()*?%]+")
_UMLAUTS = "üǖǘǚǜ"


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _strip_marks(text: str) -> str:
    """Remove combining marks (accents, pinyin tone marks): ``zhāng`` -> ``zhang``."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", kept)


def _is_han(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x3134F
        or 0xF900 <= code <= 0xFAFF
    )


def _has_han(text: str) -> bool:
    return any(_is_han(c) for c in text)


def _components(group: str) -> list[str]:
    """A group's components, each stripped, trailing empty ones dropped."""
    parts = [p.strip() for p in group.split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _groups(person_name: str) -> list[str]:
    return person_name.split(GROUP_MARK)[:3]


def group_key(group: str) -> str | None:
    """The key of one PN component group for literal matching, or None when it is empty."""
    components = _components(group)
    if not components:
        return None
    text = "^".join(re.sub(r"\s+", "", _fold(c)) for c in components)
    return (GROUP_MARK + text)[:_MAX_KEY]


def group_pattern(group: str) -> str | None:
    """``group_key`` of a query group that may hold ``*``/``?`` wildcards (kept as is)."""
    return group_key(group)


def _pinyin_variants(syllable: str) -> list[str]:
    """A syllable without tone marks; with ``ü`` also spelt ``v`` (as typed on keyboards)."""
    plain = _strip_marks(syllable)
    if any(c in _UMLAUTS for c in syllable):
        return [plain, _strip_marks(re.sub(f"[{_UMLAUTS}]", "v", syllable))]
    return [plain]


def _han_tokens(text: str, *, surname: bool) -> tuple[list[str], str, str]:
    """Tokens of Han text: characters, syllables; and its run-together pinyin and initials."""
    tokens: list[str] = [c for c in text if _is_han(c)]
    tokens.append(text)
    usual = [s for s in lazy_pinyin(text, style=Style.TONE) if s.strip()]
    readings: list[list[str]] = pinyin(text, style=Style.TONE, heteronym=surname)
    for options in readings:
        for syllable in options:
            tokens.extend(_pinyin_variants(syllable))
    joined = "".join(_strip_marks(s) for s in usual)
    initials = "".join(_strip_marks(s)[:1] for s in usual)
    return [_fold(t) for t in tokens], _fold(joined), _fold(initials)


def _latin_tokens(text: str) -> tuple[list[str], str, str]:
    """Tokens of non-Han text: words, camel-case parts; run together; camel initials."""
    words = [w for w in _WORD_SPLIT.split(text) if w]
    tokens: list[str] = []
    parts: list[str] = []
    for word in words:
        tokens.append(word)
        camel = _CAMEL.findall(word)
        if len(camel) > 1:
            tokens.extend(camel)
        parts.extend(camel or [word])
    joined = "".join(words)
    initials = "".join(p[:1] for p in parts)
    folded = [_strip_marks(_fold(t)) for t in tokens]
    return folded, _strip_marks(_fold(joined)), _strip_marks(_fold(initials))


def _add(keys: dict[str, None], values: Iterable[str]) -> None:
    for value in values:
        value = value.replace(_SEPARATOR, "").replace(GROUP_MARK, "")[:_MAX_KEY]
        if value:
            keys.setdefault(value, None)


def name_search_keys(person_name: str | None) -> str | None:
    """The value of ``patients.name_search`` for a PatientName: its keys, space-separated.

    ``person_name`` is in DICOM PN form (``alphabetic=ideographic=phonetic`` groups of
    ``^``-separated components). Returns None when there is no name. Never raises.
    """
    if person_name is None:
        return None
    group_keys: dict[str, None] = {}
    tokens: dict[str, None] = {}
    for group in _groups(person_name):
        key = group_key(group)
        if key is None:
            continue
        group_keys.setdefault(key, None)
        whole: list[str] = []
        whole_initials: list[str] = []
        for position, component in enumerate(_components(group)):
            if not component:
                continue
            if _has_han(component):
                found, joined, initials = _han_tokens(component, surname=position == 0)
            else:
                found, joined, initials = _latin_tokens(component)
            _add(tokens, found)
            _add(tokens, [joined, initials])
            whole.append(joined)
            whole_initials.append(initials)
        han = "".join(c for c in group if _is_han(c))
        if han:
            _add(tokens, [_fold(han)])
        _add(tokens, ["".join(whole), "".join(whole_initials)])
    keys = [*group_keys, *tokens]
    return _SEPARATOR.join(keys) if keys else None


def split_keys(name_search: str | None) -> list[str]:
    """The individual keys of a ``name_search`` value (one row each in patient_name_keys)."""
    return [k for k in (name_search or "").split(_SEPARATOR) if k]


def fuzzy_terms(query_value: str) -> list[str]:
    """The terms of a fuzzy PatientName query, folded like the stored tokens.

    Case folded, accents and pinyin tone marks removed, tone numbers after a syllable
    dropped (``zhang1``), split at white space, ``^``, ``=``, punctuation and wildcards.
    Returns an empty list when nothing is left (the caller treats that as universal).
    """
    folded = _strip_marks(_fold(query_value))
    folded = _TONE_NUMBER.sub("", folded)
    terms: dict[str, None] = {}
    for term in _QUERY_SPLIT.split(folded):
        term = term[:_MAX_KEY]
        if term:
            terms.setdefault(term, None)
    return list(terms)
