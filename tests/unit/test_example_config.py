"""config/gateway.example.toml against the settings: every key it names exists with the
default it shows, and every key the settings read is documented there.

General on purpose: sections come from the ``Settings`` dataclass tree, keys from the
fields (``settings.toml_key``), defaults from loading the file itself, so a key added to
the settings needs nothing here, only its line in the example.
"""

from __future__ import annotations

import re
import shutil
import tomllib
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from imaging_gateway import settings as mod
from imaging_gateway.errors import ConfigError
from imaging_gateway.settings import Settings, field_default, load_settings, toml_key

EXAMPLE = Path(__file__).parents[2] / "config" / "gateway.example.toml"
# The variables the example's *_env keys name.
ENV = {"BJ_PACS_ACCESS_KEY": "a", "BJ_PACS_SECRET_KEY": "b", "JS_PACS_TOKEN": "t"}

_HEADER = re.compile(r"^(\[\[?)\s*([a-z_.]+)\s*\]\]?\s*$")
_ACTIVE = re.compile(r"^([a-z_][a-z0-9_]*)\s*=\s*(.+)$")
_COMMENTED = re.compile(r"^#\s*([a-z_][a-z0-9_]*)\s*=\s*(.+)$")


@dataclass(frozen=True)
class Entry:
    """One ``key = value`` line of the example, active or commented out."""

    line: int
    """0-based line number."""
    section: str
    """``gateway``, ``stores``, ``federation.peers``, ..."""
    table: int
    """Which ``[[section]]`` table (0 for a plain ``[section]``)."""
    key: str
    commented: bool

    def __str__(self) -> str:
        mark = "# " if self.commented else ""
        return f"line {self.line + 1}: [{self.section}] {mark}{self.key}"


def entries(lines: list[str]) -> list[Entry]:
    """The key lines of the example; a commented line counts only when the text after
    ``#`` is a TOML ``key = value`` (prose is not)."""
    out: list[Entry] = []
    section, counts = "", dict[str, int]()
    for n, raw in enumerate(lines):
        line = raw.strip()
        if m := _HEADER.match(line):
            section = m.group(2)
            counts[section] = counts.get(section, -1) + 1
            continue
        m = _ACTIVE.match(line)
        commented = False
        if m is None and (m := _COMMENTED.match(line)) is not None:
            try:
                tomllib.loads(line.lstrip("#").strip())
            except tomllib.TOMLDecodeError:
                continue
            commented = True
        if m is not None and section:
            out.append(Entry(n, section, counts[section], m.group(1), commented))
    return out


def sections(cls: type[Any] = Settings, prefix: str = "") -> dict[str, tuple[type[Any], bool]]:
    """Section name -> (the dataclass it builds, whether it is an array of ``[[tables]]``),
    from the type hints of ``Settings``: a field holding a dataclass, or a tuple of them,
    is a section."""
    out: dict[str, tuple[type[Any], bool]] = {}
    hints = typing.get_type_hints(cls, vars(mod))
    for f in fields(cls):
        t = hints[f.name]
        array = typing.get_origin(t) is tuple
        inner = typing.get_args(t)[0] if array else t
        if isinstance(inner, type) and is_dataclass(inner):
            name = f"{prefix}{f.name}"
            out[name] = (inner, array)
            out.update(sections(inner, f"{name}."))
    return out


SECTIONS = {name: cls for name, (cls, _) in sections().items()}
ARRAYS = frozenset(name for name, (_, array) in sections().items() if array)
"""Sections written as ``[[tables]]``: examples, which need their required keys."""


def keys_of(section: str) -> dict[str, list[str]]:
    """TOML key of ``section`` -> the fields it sets (a sub-section is not a key)."""
    out: dict[str, list[str]] = {}
    for f in fields(SECTIONS[section]):
        key = toml_key(f)
        if key is not None and f"{section}.{f.name}" not in SECTIONS:
            out.setdefault(key, []).append(f.name)
    return out


def is_none(cls: type[Any], name: str) -> bool:
    """Whether the field has no default of its own: required, derived from other keys,
    or "none" (None, "", ()): the example may show an illustrative value for it."""
    default = field_default(cls, name)
    return default is None or default == "" or default == ()


def instance(s: Settings, section: str, table: int) -> Any:
    """The dataclass a section's table became."""
    value: Any = s
    for part in section.split("."):
        value = getattr(value, part)
    return value[table] if isinstance(value, tuple) else value


def unknown_keys(lines: list[str]) -> list[str]:
    """Key lines of the example that are no settings key."""
    out = []
    for e in entries(lines):
        if e.section not in SECTIONS:
            out.append(f"{e}: no such section in the settings")
        elif e.key not in keys_of(e.section):
            out.append(f"{e}: no such key in the settings")
    return out


def undocumented_keys(lines: list[str]) -> list[str]:
    """Settings keys without a line in the example."""
    found = entries(lines)
    out = []
    for section in SECTIONS:
        documented = {e.key for e in found if e.section == section}
        out += [f"[{section}] {k}" for k in sorted(set(keys_of(section)) - documented)]
    return out


def wrong_defaults(example: Path) -> list[str]:
    """Key lines (commented out or not) that do not show what the settings hold without
    them. Only a key with no default of its own (required, derived from other keys, or
    "none") may show another value: commented out, or in a ``[[table]]`` (an example
    table needs its required keys). Each line is tried alone: uncommented, or removed."""
    lines = example.read_text(encoding="utf-8").splitlines()
    as_is = load_settings(example, environ=ENV)
    out = []
    for e in entries(lines):
        cls = SECTIONS[e.section]
        names = keys_of(e.section)[e.key]
        changed = list(lines)
        if e.commented:
            changed[e.line] = lines[e.line].strip().lstrip("#").strip()
            without = as_is
            try:
                with_ = load(example, changed)
            except ConfigError as exc:
                # Needs other keys too (cert_file needs key_file, ...): a "none" key.
                if "unknown key" in exc.message or not all(is_none(cls, n) for n in names):
                    out.append(f"{e}: does not load uncommented: {exc}")
                continue
        else:
            changed[e.line] = ""
            with_ = as_is
            try:
                without = load(example, changed)
            except ConfigError:
                continue  # required here: the line shows an example value
        shown = instance(with_, e.section, e.table)
        default = instance(without, e.section, e.table)
        differ = [n for n in names if getattr(shown, n) != getattr(default, n)]
        may_differ = e.commented or e.section in ARRAYS
        if differ and not (may_differ and all(is_none(cls, n) for n in differ)):
            out.append(
                f"{e}: shows {[getattr(shown, n) for n in differ]}, "
                f"the default is {[getattr(default, n) for n in differ]}"
            )
    return out


def load(example: Path, lines: list[str]) -> Settings:
    variant = example.with_name("variant.toml")
    variant.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_settings(variant, environ=ENV)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    # A copy in a folder of its own: relative paths resolve the same in every variant.
    return Path(shutil.copy(EXAMPLE, tmp_path / "gateway.toml"))


def edit(example: Path, old: str, new: str) -> Path:
    text = example.read_text(encoding="utf-8")
    assert old in text
    example.write_text(text.replace(old, new, 1), encoding="utf-8")
    return example


def test_the_example_loads_as_it_is(example: Path) -> None:
    s = load_settings(example, environ=ENV)
    assert [st.kind for st in s.stores] == ["s3", "fs"]
    assert [p.kind for p in s.federation.peers] == ["gateway", "dicomweb"]
    assert len(entries(example.read_text(encoding="utf-8").splitlines())) > 50


def test_every_key_of_the_example_is_a_settings_key() -> None:
    assert unknown_keys(EXAMPLE.read_text(encoding="utf-8").splitlines()) == []


def test_every_settings_key_is_documented_in_the_example() -> None:
    assert undocumented_keys(EXAMPLE.read_text(encoding="utf-8").splitlines()) == []


def test_every_key_shows_its_default(example: Path) -> None:
    assert wrong_defaults(example) == []


def test_the_checks_see_a_wrong_default_an_unknown_and_a_missing_key(example: Path) -> None:
    edit(example, "\ndeadline_ms = 1500\n", "\ndeadline_ms = 1499\n")
    edit(example, "# cache_ttl_s = 604800.0", "# cache_ttl_s = 60.0")
    assert [w.split(":")[1].strip() for w in wrong_defaults(example)] == [
        "[federation] deadline_ms", "[federation] # cache_ttl_s"
    ]
    lines = example.read_text(encoding="utf-8").splitlines()
    assert unknown_keys([*lines, "# deadline_s = 3"]) == [
        f"line {len(lines) + 1}: [federation.peers] # deadline_s: no such key in the settings"
    ]
    without = [line for line in lines if not line.startswith("breaker_failures")]
    assert undocumented_keys(without) == ["[federation] breaker_failures"]


def test_loaded_defaults_are_the_dataclass_defaults(tmp_path: Path) -> None:
    """An empty file gives each field's declared default: the loader writes none of its
    own (a path: the default file under data_dir, relative to the config's folder)."""
    empty = tmp_path / "empty.toml"
    empty.write_text("", encoding="utf-8")
    s = load_settings(empty, environ={})
    checked = 0
    for section, cls in SECTIONS.items():
        if section in ARRAYS:
            continue  # no table without its required keys
        loaded = instance(s, section, 0)
        for f in fields(cls):
            if f"{section}.{f.name}" in SECTIONS or toml_key(f) is None or (
                f.default is MISSING and f.default_factory is MISSING
            ):
                continue  # a sub-section, derived, or required
            declared = field_default(cls, f.name)
            if isinstance(declared, Path) and not declared.is_absolute():
                declared = tmp_path / declared
            assert getattr(loaded, f.name) == declared, f"[{section}] {f.name}"
            checked += 1
    assert checked > 40
