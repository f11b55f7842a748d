"""QIDO-RS search on the study index (one indexed SQL query a page) and its derived data.

``search`` answers a :class:`~imaging_gateway.domain.qido.QidoQuery` on SQLite and
PostgreSQL alike: every matching key becomes a condition on an indexed column where the
standard's matching allows it, the caller's ``visible`` condition on ``studies`` is
ANDed in at every level, a page is ``limit + 1`` rows (the extra row says whether more
exist), and a time budget turns a query too broad to answer cheaply into
``QueryTooBroad`` (413) instead of a long scan.

``refresh_derived`` keeps the data QIDO-RS reads but the sync does not write directly
up to date: ModalitiesInStudy and the related-series/instance counts of studies and
series, and the PatientName search keys (``patients.name_search`` and
``patient_name_keys``).

Matching (PS3.4 C.2.2.2):

- Single value: equality (case-sensitive), except TM (a prefix: ``0830`` matches
  ``083015``) and PN (below). Wildcards ``*`` ``?``: GLOB on SQLite (case-sensitive,
  with a prefix range so the index is used), LIKE on PostgreSQL (index-backed by the
  ``varchar_pattern_ops`` indexes of 0003 for PatientID and AccessionNumber).
- UID list: ``IN``. Ranges (DA, TM, DT): inclusive, either end open; a partial upper
  time bound includes everything it prefixes (``-1000`` includes ``100059``).
- ModalitiesInStudy: the study has a series of (any of) the modalities, checked on the
  derived studies.ModalitiesInStudy column (a wildcard value checks the series).
- RequestAttributesSequence items: sequence matching, a series with a matching item.
- PatientName: literal matching through the group keys of ``patient_name_keys`` (case
  and group position insensitive, see ``imaging_gateway.domain.names``); with
  ``fuzzymatching=true`` through its fuzzy tokens (every term a token prefix).
  ReferringPhysicianName: case-sensitive, a single value equal to one of the stored
  component groups, wildcards over the whole stored value.

On an encrypted index (``phi``, see ``imaging_gateway.crypto.phi``) PatientID and
AccessionNumber match by blind index (single values), PatientName by the blind indexes of
its keys (whole fuzzy terms, single values, a literal prefix with one trailing ``*`` per
group); other matching on sealed columns is refused (400).

Instance results are one per SOPInstanceUID within a series: of several objects
claiming one SOPInstanceUID (see the conflicts table) the one indexed first is shown.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.util.concurrency import await_

from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.domain.attributes import ATTRIBUTES, ITEM_ATTRIBUTES
from imaging_gateway.domain.names import (
    GROUP_MARK,
    fuzzy_terms,
    group_key,
    group_pattern,
    name_search_keys,
    split_keys,
)
from imaging_gateway.domain.qido import (
    AttributeMatch,
    QidoPage,
    QidoQuery,
    QidoResult,
)
from imaging_gateway.errors import InvalidQuery, QueryTooBroad
from imaging_gateway.index.schema import (
    instances,
    patient_name_keys,
    patients,
    series,
    series_requests,
    studies,
)

__all__ = [
    "COUNT_CAP",
    "TIME_BUDGET",
    "install_time_budget",
    "mark_session_time_budget",
    "refresh_derived",
    "refresh_patient_names",
    "search",
    "search_in",
    "session_time_budget",
]

TIME_BUDGET = 2.0
"""Seconds a search may take before it is refused as too broad (QueryTooBroad, 413)."""
COUNT_CAP = 0
"""Remaining matches are counted up to this many (beyond: "additional results").

Counting evaluates the remaining matches, up to the cap: it can double the cost of a
broad search, so by default the warning carries no number."""
_CHUNK = 500

# The search joins patients under an alias, so that a ``visible`` condition may correlate
# its own subqueries on ``patients`` with ``studies`` alone.
_patient = patients.alias("patient")

# The joined table of each level (patients under the alias above).
_TABLES: dict[str, sa.FromClause] = {
    "patients": _patient,
    "studies": studies,
    "series": series,
    "instances": instances,
    "series_requests": series_requests,
}

COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    a.keyword: _TABLES[a.table].c[a.column]
    for a in ATTRIBUTES.values()
    if a.column is not None and a.source != "computed"
}
"""Keyword -> the index column that holds it: every stored entry of the attribute table
(``imaging_gateway.domain.attributes``), which also says how each is matched."""

# Held as backslash-separated values, returned as a list (ModalitiesInStudy).
_MULTI_VALUED = frozenset(k for k, a in ATTRIBUTES.items() if a.matching == "list")

# Built once: labels and joins are immutable, and building them per search was a
# noticeable part of a search's fixed cost.
_LABELED: dict[str, sa.ColumnElement[Any]] = {k: c.label(k) for k, c in COLUMNS.items()}
_STUDY_HIDDEN: list[sa.ColumnElement[Any]] = [
    studies.c.StudyInstanceUID.label("_study_uid"),
    # Whose study it is, for the gate's audit record (its patient token).
    _patient.c.national_id.label("_national_id"),
    _patient.c.patient_key.label("_patient_key"),
]
_SERIES_HIDDEN: list[sa.ColumnElement[Any]] = [
    *_STUDY_HIDDEN,
    series.c.id.label("_series_id"),
    # The row identity of the series' sealed cells in an encrypted index.
    series.c.SeriesInstanceUID.label("_series_uid"),
]
_HIDDEN: dict[str, list[sa.ColumnElement[Any]]] = {
    "study": _STUDY_HIDDEN,
    "series": _SERIES_HIDDEN,
    "instance": _SERIES_HIDDEN,
}

# An encrypted index (crypto.phi): keyword -> (sealed column, hidden label of the row
# identity its cells are bound to).
_ROW_IDENTITY: dict[str, str] = {
    "patients": "_patient_key",
    "studies": "_study_uid",
    "series": "_series_uid",
}
_SEALED: dict[str, tuple[str, str]] = {
    a.keyword: (f"{a.table}.{a.column}", _ROW_IDENTITY[a.table])
    for a in ATTRIBUTES.values()
    if a.sealed
}
# Sealed keywords matched through a blind index (single values only).
_BLIND_MATCHED: dict[str, str] = {
    a.keyword: a.blind_index for a in ATTRIBUTES.values() if a.blind_index is not None
}
_NAME_KEY = "patient_name_keys.key"
_NAME_PREFIX = "patient_name_keys.prefix"
"""Blind-index namespace of the prefixes of a name's group keys (``Zhang*`` matching)."""
_UNSUPPORTED_NAME = (
    "wildcard matching other than a trailing * (use fuzzymatching=true with whole words, "
    "pinyin syllables or initials, a single value, or a value ending in *)"
)


def not_searchable(keyword: str, what: str) -> InvalidQuery:
    """The 400 answer to a matching key an encrypted index cannot answer."""
    return InvalidQuery(
        f"{keyword}: {what} is not supported while the index's PHI columns are encrypted"
    )


def sealed_name_keys(phi: PhiCodec, name_search: str | None) -> set[str]:
    """The ``patient_name_keys`` rows of a name in an encrypted index: the blind index of
    each search key, and of each prefix of each group key (``=z``, ``=zh``, ... ``=zhang^san``)
    in a namespace of their own, so that ``Zhang*`` is one equality too."""
    out: set[str] = set()
    for key in split_keys(name_search):
        out.add(phi.blind(key, column=_NAME_KEY) or "")
        if key.startswith(GROUP_MARK):
            out.update(
                phi.blind(key[:n], column=_NAME_PREFIX) or "" for n in range(2, len(key) + 1)
            )
    return out


_STUDY_JOIN = studies.join(_patient, _patient.c.id == studies.c.patient_id)
_SERIES_JOIN = series.join(studies, studies.c.id == series.c.study_id).join(
    _patient, _patient.c.id == studies.c.patient_id
)
_JOINED: dict[str, sa.FromClause] = {
    "study": _STUDY_JOIN,
    "series": _SERIES_JOIN,
    "instance": instances.join(series, series.c.id == instances.c.series_id)
    .join(studies, studies.c.id == series.c.study_id)
    .join(_patient, _patient.c.id == studies.c.patient_id),
}

_REQUEST_ITEM_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    a.keyword: _TABLES[a.table].c[a.column]
    for a in ITEM_ATTRIBUTES.values()
    if a.column is not None
}
_INTEGER_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "UV", "SV"})


# ---------------------------------------------------------------------- matching


def _succ(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _literal_prefix(pattern: str) -> str:
    cut = min((i for i, c in enumerate(pattern) if c in "*?"), default=len(pattern))
    return pattern[:cut]


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _glob(pattern: str) -> str:
    # GLOB has no escape character: a literal "[" is the set "[[]"; "*" and "?" are
    # DICOM's wildcards already.
    return pattern.replace("[", "[[]")


class _Plan:
    """Matching keys as a statement shape (hashable, without values) and its values.

    Every value a condition needs becomes a named bind parameter (``q0``, ``q1``, ... in
    order) and every decision a value makes about the statement's form (a wildcard with a
    literal prefix or not, how many fuzzy terms, ...) is written into the shape. Equal
    shapes therefore build the same statement whatever the values, so a search reuses
    the statement built for its shape (see ``_statement``) instead of building it and
    its cache key anew: that was a third of a search's CPU. The SQL comes from the shape
    only (``_build``), so a plan and its statement cannot disagree.
    """

    def __init__(self, *, sqlite: bool, fuzzy: bool, phi: PhiCodec | None = None) -> None:
        self.sqlite = sqlite
        self.fuzzy = fuzzy
        self.phi = phi
        self.values: dict[str, Any] = {}

    def bind(self, value: Any) -> str:
        name = f"q{len(self.values)}"
        self.values[name] = value
        return name

    def wildcard(self, column: str, pattern: str) -> _Op:
        prefix = _literal_prefix(pattern)
        if self.sqlite:
            glob = ("glob", column, self.bind(_glob(pattern)))
            if not prefix:
                return glob
            # BINARY collation: the range is exactly the prefix, and uses the index.
            return ("and", (("ge", column, self.bind(prefix)),
                            ("lt", column, self.bind(_succ(prefix))), glob))  # fmt: skip
        return ("like", column, self.bind(_like(pattern)))

    def value(self, column: str, m: AttributeMatch) -> _Op:
        """Single, wildcard, list or range matching of ``m`` on ``column``."""
        if m.kind == "list":
            return ("in", column, self.bind(list(m.values)))
        if m.kind == "wildcard":
            return self.wildcard(column, m.value)
        if m.kind == "range":
            conds: list[_Op] = []
            if m.low is not None:
                conds.append(("ge", column, self.bind(m.low)))
            if m.high is not None:
                if m.vr == "DA":
                    conds.append(("le", column, self.bind(m.high)))
                else:
                    conds.append(("lt", column, self.bind(_succ(m.high))))
            return ("and", tuple(conds))
        if m.vr in _INTEGER_VRS:
            return ("eq", column, self.bind(int(m.value)))
        if m.vr in ("TM", "DT"):
            return ("and", (("ge", column, self.bind(m.value)),
                            ("lt", column, self.bind(_succ(m.value)))))  # fmt: skip
        return ("eq", column, self.bind(m.value))

    def patient_name(self, m: AttributeMatch) -> _Op | None:
        if self.phi is not None:
            return self.sealed_patient_name(m, self.phi)
        conds: list[_Op] = []
        if self.fuzzy:
            for term in fuzzy_terms(m.value):
                bounds = (("ge", "key", self.bind(term)), ("lt", "key", self.bind(_succ(term))))
                conds.append(("and", bounds))
        else:
            for group in m.value.split(GROUP_MARK)[:3]:
                if m.kind == "single":
                    literal = group_key(group)
                    if literal is not None:
                        conds.append(("eq", "key", self.bind(literal)))
                    continue
                pattern = group_pattern(group)
                if pattern is None or pattern.strip("*") == GROUP_MARK:
                    continue
                prefix = _literal_prefix(pattern)
                conds.append(("and", (
                    ("ge", "key", self.bind(prefix)),
                    ("lt", "key", self.bind(_succ(prefix))),
                    ("like", "key", self.bind(_like(pattern))),
                )))  # fmt: skip
        return ("keys", tuple(conds)) if conds else None

    def sealed_patient_name(self, m: AttributeMatch, phi: PhiCodec) -> _Op | None:
        """PatientName on an encrypted index: every fuzzy term, or every literal group, must
        equal one of the name's blinded keys (no prefixes: a blind index has no order)."""
        keys: list[tuple[str, str]] = []
        if self.fuzzy:
            keys = [(t, _NAME_KEY) for t in fuzzy_terms(m.value)]
        elif m.kind == "single":
            groups = m.value.split(GROUP_MARK)[:3]
            keys = [(k, _NAME_KEY) for g in groups if (k := group_key(g)) is not None]
        else:
            # Each group a literal prefix and one trailing * (as PACS send ``ZHANG*``):
            # equal to one of the stored prefixes of a group key.
            for group in m.value.split(GROUP_MARK)[:3]:
                pattern = group_pattern(group)
                if pattern is None or pattern.strip("*") == GROUP_MARK:
                    continue
                prefix = pattern[:-1]
                if not pattern.endswith("*") or any(c in prefix for c in "*?"):
                    raise not_searchable("PatientName", _UNSUPPORTED_NAME)
                keys.append((prefix, _NAME_PREFIX))
        conds: list[_Op] = [
            ("eq", "key", self.bind(phi.blind(k, column=space))) for k, space in keys
        ]
        return ("keys", tuple(conds)) if conds else None

    def sealed(self, m: AttributeMatch, phi: PhiCodec) -> _Op:
        """A sealed column's matching: through its blind index, or refused (400)."""
        column = _BLIND_MATCHED.get(m.keyword)
        if column is None:
            raise not_searchable(m.keyword, "matching")
        sealed_as = _SEALED[m.keyword][0]
        if m.kind != "single":
            raise not_searchable(m.keyword, f"{m.kind} matching")
        return ("eq", column, self.bind(phi.blind(m.value, column=sealed_as)))

    def other_name(self, column: str, m: AttributeMatch) -> _Op:
        if m.kind == "wildcard":
            return self.wildcard(column, m.value)
        v = _like(m.value)
        return ("or", (
            ("eq", column, self.bind(m.value)),
            ("like", column, self.bind(v + GROUP_MARK + "%")),
            ("like", column, self.bind("%" + GROUP_MARK + v)),
            ("like", column, self.bind("%" + GROUP_MARK + v + GROUP_MARK + "%")),
        ))  # fmt: skip

    def condition(self, m: AttributeMatch) -> _Op | None:
        """The plan of one matching key; None for universal matching."""
        if m.kind == "universal":
            return None
        matching = ATTRIBUTES[m.keyword].matching
        if matching == "fuzzy":
            return self.patient_name(m)
        if self.phi is not None and m.keyword in _SEALED:
            return self.sealed(m, self.phi)
        if matching == "list":
            # ModalitiesInStudy (the one list-matched attribute): derived from the
            # Modality of the study's series.
            if m.kind == "wildcard":
                return ("study-has-series", self.wildcard("Modality", m.value))
            # The derived column, checked on the study row itself: no per-study probe
            # of series, and the study's date index keeps serving the order.
            return ("or", tuple(("has-value", m.keyword, self.bind(f"\\{v}\\"))
                                for v in (m.values or (m.value,))))  # fmt: skip
        if matching == "sequence":
            # RequestAttributesSequence (the one sequence held): its items' table.
            return ("series-has-request", self.value(f"request:{m.leaf}", m))
        if m.vr == "PN":
            return self.other_name(m.keyword, m)
        return self.value(m.keyword, m)


_Op = tuple[Any, ...]
"""A plan node: ``(operation, ...)`` with column names and bind parameter names."""

# Columns a plan may name, beyond COLUMNS' keywords.
_PLAN_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    **COLUMNS,
    "Modality": series.c.Modality,
    "key": patient_name_keys.c.key,
    **{
        a.blind_index: _TABLES[a.table].c[a.blind_index]
        for a in ATTRIBUTES.values()
        if a.blind_index is not None
    },
    **{f"request:{k}": c for k, c in _REQUEST_ITEM_COLUMNS.items()},
}


def _build(op: _Op, *, sqlite: bool) -> ColumnElement[bool]:
    """The SQL condition of a plan node; its values stay bind parameters."""
    kind = op[0]
    if kind in ("and", "or"):
        parts = [_build(o, sqlite=sqlite) for o in op[1]]
        return sa.and_(*parts) if kind == "and" else sa.or_(*parts)
    if kind == "keys":
        # The patients having a key matching each condition: the sets intersected first
        # (each an index-only range of patient_name_keys), then their studies. As one
        # semi-join per condition the planner could start from all patients or all of
        # the hospital's studies, and common syllables ("li", "yang") made that grow
        # with the index (30 ms at 1M instances for "lin yang", PostgreSQL).
        each = [
            sa.select(patient_name_keys.c.patient_id).where(_build(c, sqlite=sqlite))
            for c in op[1]
        ]
        keys: Any = each[0] if len(each) == 1 else sa.intersect(*each)
        return studies.c.patient_id.in_(keys)
    if kind == "study-has-series":
        having = sa.select(series.c.study_id).where(_build(op[1], sqlite=sqlite))
        return studies.c.id.in_(having)
    if kind == "series-has-request":
        item = sa.select(series_requests.c.series_id).where(_build(op[1], sqlite=sqlite))
        return series.c.id.in_(item)
    column, name = _PLAN_COLUMNS[op[1]], op[2]
    if kind == "has-value":
        # ``column`` holds backslash-separated values, one of them exactly the value.
        wrapped = sa.literal("\\") + column + sa.literal("\\")
        find = sa.func.instr if sqlite else sa.func.strpos
        return find(wrapped, sa.bindparam(name, type_=sa.String())) > 0
    if kind == "in":
        return column.in_(sa.bindparam(name, expanding=True))
    param: sa.BindParameter[Any] = sa.bindparam(name)
    if kind == "glob":
        return column.op("GLOB", is_comparison=True)(param)
    if kind == "like":
        return column.like(param, escape="\\")
    if kind == "eq":
        return column == param
    if kind == "ge":
        return column >= param
    if kind == "le":
        return column <= param
    if kind == "lt":
        return column < param
    raise AssertionError(f"unknown plan node {kind}")  # pragma: no cover


# ---------------------------------------------------------------------- search

_STATEMENTS: OrderedDict[tuple[Any, ...], tuple[ColumnElement[bool], sa.Select[Any]]] = (
    OrderedDict()
)
_STATEMENTS_MAX = 512


def _statement(
    query: QidoQuery, visible: ColumnElement[bool], dialect: str, phi: PhiCodec | None = None
) -> tuple[sa.Select[Any], dict[str, Any]]:
    """The page statement of ``query`` (LIMIT ``:page_limit`` OFFSET ``:page_offset``)
    and the values of its bind parameters, except those of ``visible``.

    Raises ``InvalidQuery`` for matching an encrypted index cannot answer (with ``phi``).
    """
    plan = _Plan(sqlite=dialect == "sqlite", fuzzy=query.fuzzymatching, phi=phi)
    uids = (
        None if query.study_uid is None else plan.bind(query.study_uid),
        None if query.series_uid is None else plan.bind(query.series_uid),
    )
    conditions = tuple(c for m in query.matches if (c := plan.condition(m)) is not None)
    keywords = tuple(k for k in query.return_keywords if k in COLUMNS)
    shape = (id(visible), dialect, query.level, query.resource, keywords, uids, conditions)
    cached = _STATEMENTS.get(shape)
    # The cached statement is used only with the very condition it was built with (an
    # id can be reused once its object is gone).
    if cached is not None and cached[0] is visible:
        _STATEMENTS.move_to_end(shape)
        stmt = cached[1]
    else:
        stmt = _build_statement(query.level, query.resource, keywords, visible, uids,
                                conditions, sqlite=plan.sqlite)  # fmt: skip
        _STATEMENTS[shape] = (visible, stmt)
        if len(_STATEMENTS) > _STATEMENTS_MAX:
            _STATEMENTS.popitem(last=False)
    return stmt, plan.values


def _build_statement(
    level: str,
    resource: str,
    keywords: tuple[str, ...],
    visible: ColumnElement[bool],
    uids: tuple[str | None, str | None],
    conditions: tuple[_Op, ...],
    *,
    sqlite: bool,
) -> sa.Select[Any]:
    columns: list[sa.ColumnElement[Any]] = [_LABELED[k] for k in keywords]
    columns += _HIDDEN[level]
    where: list[ColumnElement[bool]] = [visible]
    study_uid, series_uid = uids
    if study_uid is not None:
        where.append(studies.c.StudyInstanceUID == sa.bindparam(study_uid))
    if series_uid is not None:
        where.append(series.c.SeriesInstanceUID == sa.bindparam(series_uid))
    where += [_build(c, sqlite=sqlite) for c in conditions]
    order: list[sa.ColumnElement[Any]]
    if level == "instance":
        earlier = instances.alias("earlier")
        # One result per SOPInstanceUID in a series: the object indexed first.
        where.append(
            ~sa.exists(
                sa.select(sa.literal(1)).where(
                    earlier.c.SOPInstanceUID == instances.c.SOPInstanceUID,
                    earlier.c.series_id == instances.c.series_id,
                    earlier.c.id < instances.c.id,
                )
            )
        )
        if resource == "all-instances":
            order = [studies.c.StudyDate.desc(), studies.c.id.desc(), series.c.id, instances.c.id]
        else:
            order = [
                sa.nulls_last(series.c.SeriesNumber.asc()),
                series.c.id,
                sa.nulls_last(instances.c.InstanceNumber.asc()),
                instances.c.id,
            ]
    elif level == "series":
        if resource == "all-series":
            # The studies' order first: the date index serves it, only each study's
            # few series are sorted.
            order = [studies.c.StudyDate.desc(), studies.c.id.desc(), series.c.id]
        else:
            order = [sa.nulls_last(series.c.SeriesNumber.asc()), series.c.id]
    else:
        # Newest first; ix_studies_date (with the row id) gives this order without a sort.
        order = [studies.c.StudyDate.desc(), studies.c.id.desc()]
    return (
        sa.select(*columns)
        .select_from(_JOINED[level])
        .where(*where)
        .order_by(*order)
        .limit(sa.bindparam("page_limit", type_=sa.Integer()))
        .offset(sa.bindparam("page_offset", type_=sa.Integer()))
    )


class _Deadline:
    """When the statements of a search on one SQLite connection must stop (monotonic s)."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = math.inf


_DEADLINE = "imaging_gateway.qido.deadline"
_SESSION_BUDGET = "imaging_gateway.qido.session_budget_ms"
_PROGRESS_STEPS = 20_000
"""SQLite virtual machine instructions between two checks of the deadline."""


def _progress_handler(deadline: _Deadline) -> Callable[[], int]:
    def expired() -> int:
        return 1 if time.monotonic() > deadline.at else 0

    return expired


def install_time_budget(dbapi_conn: Any, record: Any) -> None:
    """SQLAlchemy ``connect`` listener of SQLite (aiosqlite) engines: installs the
    progress handler that enforces the search time budget, once per connection.

    A search then only sets the connection's deadline: no driver call (an aiosqlite
    thread round trip each) per search.
    """
    deadline = _Deadline()
    await_(
        record.driver_connection.set_progress_handler(_progress_handler(deadline), _PROGRESS_STEPS)
    )
    record.info[_DEADLINE] = deadline


def session_time_budget(seconds: float = TIME_BUDGET) -> dict[str, Any]:
    """``connect_args`` of a PostgreSQL (asyncpg) engine whose every statement runs under
    the search time budget: the session's ``statement_timeout``, set as the connection
    opens, so a search on it needs no ``SET LOCAL`` round trip."""
    return {"server_settings": {"statement_timeout": str(_millis(seconds))}}


def mark_session_time_budget(seconds: float = TIME_BUDGET) -> Callable[[Any, Any], None]:
    """SQLAlchemy ``connect`` listener to pair with ``session_time_budget``: records on
    each connection the budget its session enforces."""

    def mark(_dbapi_conn: Any, record: Any) -> None:
        record.info[_SESSION_BUDGET] = _millis(seconds)

    return mark


def _millis(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@asynccontextmanager
async def _time_budget(conn: AsyncConnection, seconds: float) -> AsyncIterator[None]:
    """Abort statements running past ``seconds`` (PostgreSQL timeout, SQLite progress handler)."""
    if conn.dialect.name == "postgresql":
        if conn.info.get(_SESSION_BUDGET) != _millis(seconds):
            await conn.execute(sa.text(f"SET LOCAL statement_timeout = {_millis(seconds)}"))
        yield
        return
    if conn.dialect.name != "sqlite":  # pragma: no cover - only the two dialects are used
        yield
        return
    installed = conn.info.get(_DEADLINE)
    if isinstance(installed, _Deadline):
        installed.at = time.monotonic() + seconds
        try:
            yield
        finally:
            installed.at = math.inf
        return
    # An engine made without ``install_time_budget``: a handler for this search only.
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    deadline = _Deadline()
    deadline.at = time.monotonic() + seconds
    await driver.set_progress_handler(_progress_handler(deadline), _PROGRESS_STEPS)
    try:
        yield
    finally:
        await driver.set_progress_handler(None, 0)


def _timed_out(exc: DBAPIError) -> bool:
    orig = exc.orig
    return (
        getattr(orig, "sqlstate", None) == "57014"
        or "interrupted" in str(orig)
        or "statement timeout" in str(orig)
    )


async def _request_items(
    conn: AsyncConnection, series_ids: Sequence[int]
) -> dict[int, list[dict[str, str | None]]]:
    items: dict[int, list[dict[str, str | None]]] = defaultdict(list)
    for start in range(0, len(series_ids), _CHUNK):
        chunk = list(series_ids[start : start + _CHUNK])
        q = (
            sa.select(
                series_requests.c.series_id,
                series_requests.c.ScheduledProcedureStepID,
                series_requests.c.RequestedProcedureID,
            )
            .where(series_requests.c.series_id.in_(chunk))
            .order_by(series_requests.c.series_id, series_requests.c.id)
        )
        for sid, sps, rp in (await conn.execute(q)).all():
            items[sid].append({"ScheduledProcedureStepID": sps, "RequestedProcedureID": rp})
    return items


Items = dict[int, list[dict[str, str | None]]]
"""Series id -> its RequestAttributesSequence items."""


def _result(row: Any, query: QidoQuery, items: Items, phi: PhiCodec | None) -> QidoResult:
    m = row._mapping
    national_id = m["_national_id"]
    if phi is not None:
        # Opened here, where rows become results: each cell checked against its row.
        m = dict(m)
        for keyword in query.return_keywords:
            if keyword in _SEALED and keyword in m:
                column, row_id = _SEALED[keyword]
                m[keyword] = phi.open(m[keyword], column=column, row=m[row_id])
        national_id = phi.open(national_id, column="patients.national_id", row=m["_patient_key"])
    attributes: dict[str, Any] = {}
    for keyword in query.return_keywords:
        if keyword in _MULTI_VALUED:
            value = m[keyword]
            attributes[keyword] = value.split("\\") if value else None
        elif keyword == "InstanceAvailability":
            # Every indexed object is in an online object store (PS3.4 C.4.23.1.1).
            attributes[keyword] = "ONLINE"
        elif keyword == "RequestAttributesSequence":
            attributes[keyword] = items.get(m["_series_id"]) or None
        elif keyword in COLUMNS:
            attributes[keyword] = m[keyword]
    return QidoResult(
        attributes=attributes,
        study_instance_uid=str(m["_study_uid"]),
        national_id=national_id,
        patient_key=str(m["_patient_key"]),
    )


async def search(
    engine: AsyncEngine,
    query: QidoQuery,
    *,
    visible: ColumnElement[bool],
    params: Mapping[str, Any] | None = None,
    max_results: int,
    time_budget: float = TIME_BUDGET,
    count_cap: int = COUNT_CAP,
    phi: PhiCodec | None = None,
) -> QidoPage:
    """``search_in`` on a connection of its own; raises what ``search_in`` raises."""
    async with engine.connect() as conn:
        return await search_in(
            conn,
            query,
            visible=visible,
            params=params,
            max_results=max_results,
            time_budget=time_budget,
            count_cap=count_cap,
            phi=phi,
        )


async def search_in(
    conn: AsyncConnection,
    query: QidoQuery,
    *,
    visible: ColumnElement[bool],
    params: Mapping[str, Any] | None = None,
    max_results: int,
    time_budget: float = TIME_BUDGET,
    count_cap: int = COUNT_CAP,
    phi: PhiCodec | None = None,
) -> QidoPage:
    """Answer a QIDO-RS search (PS3.18 10.6) from the index: one page of results.

    Runs on ``conn`` (in its transaction, if one is open: the gate appends the audit
    record to the same one). ``visible`` is a condition on the ``studies`` table (it may
    correlate subqueries with ``patients``) and ``params`` the values of its bind
    parameters; it is ANDed into the search at every level, so no result (and no count)
    comes from a study outside it. At most ``max_results`` results are returned whatever
    ``limit`` asks; when results were cut, ``more`` is set and a warning says how many
    remain (counted up to ``count_cap``).

    With ``phi`` (an encrypted index) matching goes through blind indexes and sealed
    cells are opened into the results.

    Raises ``QueryTooBroad`` (413) when a statement runs past ``time_budget`` seconds;
    ``InvalidQuery`` for matching an encrypted index cannot answer; ``IntegrityError``
    / ``KeyNotFound`` for a sealed cell that does not open; other database errors
    propagate as SQLAlchemy raises them.
    """
    page_size = min(query.limit or max_results, max_results)
    warnings = list(query.warnings)
    if query.limit is not None and query.limit > max_results:
        warnings.append(
            f"The limit {query.limit} exceeds the maximum of {max_results} results per "
            f"response; at most {max_results} were returned."
        )
    stmt, values = _statement(query, visible, conn.dialect.name, phi)
    values.update(params or {})
    remaining: int | None = None
    try:
        async with _time_budget(conn, time_budget):
            page_values = {**values, "page_limit": page_size + 1, "page_offset": query.offset}
            rows = list((await conn.execute(stmt, page_values)).all())
            more = len(rows) > page_size
            rows = rows[:page_size]
            items: dict[int, list[dict[str, str | None]]] = {}
            if rows and "RequestAttributesSequence" in query.return_keywords:
                items = await _request_items(conn, [r._mapping["_series_id"] for r in rows])
            if more and count_cap > 0:
                counted = (
                    stmt.with_only_columns(sa.literal(1), maintain_column_froms=True)
                    .order_by(None)
                    .offset(query.offset + page_size)
                    .limit(count_cap)
                    .subquery()
                )
                n = int(
                    (
                        await conn.execute(sa.select(sa.func.count()).select_from(counted), values)
                    ).scalar_one()
                )
                remaining = n if n < count_cap else None
    except DBAPIError as exc:
        if _timed_out(exc):
            raise QueryTooBroad(
                f"The search could not be answered within {time_budget:g} s; narrow it "
                "(e.g. PatientID, AccessionNumber, a StudyDate range or a UID)."
            ) from exc
        raise
    if more:
        warnings.append(
            f"There are {remaining} additional results that can be requested"
            if remaining is not None
            else "There are additional results that can be requested"
        )
    return QidoPage(
        results=[_result(r, query, items, phi) for r in rows],
        more=more,
        remaining=remaining,
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------- derived data


async def refresh_derived(
    conn: AsyncConnection, study_ids: Iterable[int], *, phi: PhiCodec | None = None
) -> None:
    """Recompute the derived QIDO-RS data of these studies, their series and patients.

    Sets studies.ModalitiesInStudy / NumberOfStudyRelatedSeries /
    NumberOfStudyRelatedInstances, series.NumberOfSeriesRelatedInstances (instances
    counted once per SOPInstanceUID), and for the studies' patients ``name_search`` and
    their ``patient_name_keys`` rows. Call it in the transaction that changed the studies'
    series or instances, with every such study's id (ids of studies since deleted are
    ignored). Idempotent. With ``phi`` (an encrypted index) the name keys are blinded and
    ``name_search`` stays null. Raises what SQLAlchemy raises.
    """
    ids = sorted(set(study_ids))
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        owners = await _refresh_counts(conn, chunk)
        if owners:
            await refresh_patient_names(conn, owners, phi=phi)


def _ids_in(column: sa.ColumnElement[Any], ids: Sequence[int], *, sqlite: bool) -> Any:
    """``column`` among ``ids``: one array parameter on PostgreSQL (``= ANY``), so the
    statement is one prepared shape whatever the count; an IN list on SQLite."""
    if sqlite:
        return column.in_(list(ids))
    return column == sa.func.any(sa.cast(sa.literal(list(ids)), postgresql.ARRAY(sa.Integer)))


async def _refresh_counts(conn: AsyncConnection, study_ids: list[int]) -> list[int]:
    """Recount these studies and their series; returns the studies' patient ids.

    Only rows whose values change are written (a sync page touching one instance of a
    study rewrites no other row: less WAL and no dead tuples on PostgreSQL).
    """
    sqlite = conn.dialect.name == "sqlite"
    columns = (series.c.id, series.c.study_id, series.c.Modality)
    q: sa.Select[Any]
    if sqlite:
        q = (
            sa.select(
                *columns,
                sa.func.count(sa.distinct(instances.c.SOPInstanceUID)),
                series.c.NumberOfSeriesRelatedInstances,
            )
            .select_from(series.outerjoin(instances, instances.c.series_id == series.c.id))
            .where(series.c.study_id.in_(study_ids))
            .group_by(*columns, series.c.NumberOfSeriesRelatedInstances)
        )
    else:
        # A correlated count per series, so the instances are read through
        # ix_instances_series whatever the planner knows: as the join SQLite runs, planned
        # on a freshly loaded table without statistics, PostgreSQL scanned every instance
        # for each chunk (1 s per 500 studies at 1M instances, ~10 s at 10M).
        per_series = (
            sa.select(sa.func.count(sa.distinct(instances.c.SOPInstanceUID)))
            .where(instances.c.series_id == series.c.id)
            .scalar_subquery()
        )
        q = sa.select(*columns, per_series, series.c.NumberOfSeriesRelatedInstances).where(
            _ids_in(series.c.study_id, study_ids, sqlite=False)
        )
    per_study: dict[int, tuple[list[int], set[str]]] = {i: ([], set()) for i in study_ids}
    series_rows = []
    for series_id, study_id, modality, n, stored in (await conn.execute(q)).all():
        counts, modalities = per_study[study_id]
        counts.append(int(n))
        if modality:
            modalities.add(modality)
        if stored != n:
            series_rows.append({"_id": series_id, "_n": int(n)})
    if series_rows:
        await _update_rows(
            conn, series, series_rows, {"_n": ("NumberOfSeriesRelatedInstances", sa.Integer())}
        )
    current = (
        await conn.execute(
            sa.select(
                studies.c.id,
                studies.c.patient_id,
                studies.c.ModalitiesInStudy,
                studies.c.NumberOfStudyRelatedSeries,
                studies.c.NumberOfStudyRelatedInstances,
            ).where(_ids_in(studies.c.id, study_ids, sqlite=sqlite))
        )
    ).all()
    study_rows = []
    for study_id, _patient_id, *stored in current:
        counts, modalities = per_study[study_id]
        wanted = ["\\".join(sorted(modalities))[:200] or None, len(counts), sum(counts)]
        if stored != wanted:
            study_rows.append(
                {"_id": study_id, "_m": wanted[0], "_ns": wanted[1], "_ni": wanted[2]}
            )
    if study_rows:
        await _update_rows(
            conn,
            studies,
            study_rows,
            {
                "_m": ("ModalitiesInStudy", sa.Text()),
                "_ns": ("NumberOfStudyRelatedSeries", sa.Integer()),
                "_ni": ("NumberOfStudyRelatedInstances", sa.Integer()),
            },
        )
    return sorted({row[1] for row in current})


def _unnest(columns: Mapping[str, tuple[list[Any], sa.types.TypeEngine[Any]]]) -> Any:
    """Rows from parallel arrays, one bind parameter each: ``unnest(...) AS v(name, ...)``."""
    arrays = [
        sa.cast(sa.literal(values, postgresql.ARRAY(type_)), postgresql.ARRAY(type_))
        for values, type_ in columns.values()
    ]
    return sa.func.unnest(*arrays).table_valued(*columns).render_derived(name="v")


async def _update_rows(
    conn: AsyncConnection,
    table: sa.Table,
    rows: list[dict[str, Any]],
    values: Mapping[str, tuple[str, sa.types.TypeEngine[Any]]],
) -> None:
    """Set columns of rows by id: ``rows`` hold ``_id`` and, per ``values`` entry
    (parameter -> (column, type)), the column's new value.

    On PostgreSQL one ``UPDATE ... FROM unnest(arrays)``: sent row by row (executemany)
    each row costs a statement execution on the server (~30-90 us at 1M instances, most
    of the derived-data fill); SQLite runs the executemany in process.
    """
    if conn.dialect.name == "sqlite":
        await conn.execute(
            table.update()
            .where(table.c.id == sa.bindparam("_id"))
            .values({column: sa.bindparam(param) for param, (column, _) in values.items()}),
            rows,
        )
        return
    v = _unnest(
        {
            "id": ([r["_id"] for r in rows], sa.Integer()),
            **{param: ([r[param] for r in rows], type_) for param, (_, type_) in values.items()},
        }
    )
    await conn.execute(
        table.update()
        .where(table.c.id == v.c.id)
        .values({column: v.c[param] for param, (column, _) in values.items()})
    )


async def refresh_patient_names(
    conn: AsyncConnection, patient_ids: Any, *, phi: PhiCodec | None = None
) -> None:
    """Bring ``name_search`` and ``patient_name_keys`` of these patients (a list of ids or
    a subquery of them) up to date with their PatientName. Raises what SQLAlchemy raises,
    and with ``phi`` what ``PhiCodec.open`` raises."""
    people = (
        await conn.execute(
            sa.select(
                patients.c.id,
                patients.c.PatientName,
                patients.c.name_search,
                patients.c.patient_key,
            ).where(
                _ids_in(patients.c.id, patient_ids, sqlite=conn.dialect.name == "sqlite")
                if isinstance(patient_ids, list)
                else patients.c.id.in_(patient_ids)
            )
        )
    ).all()
    if not people:
        return
    pids = [p[0] for p in people]
    stored: dict[int, set[str]] = defaultdict(set)
    for key, pid in (
        await conn.execute(
            sa.select(patient_name_keys.c.key, patient_name_keys.c.patient_id).where(
                _ids_in(patient_name_keys.c.patient_id, pids, sqlite=conn.dialect.name == "sqlite")
            )
        )
    ).all():
        stored[pid].add(key)
    renamed: list[dict[str, Any]] = []
    gone: list[tuple[int, str]] = []
    new: list[dict[str, Any]] = []
    for pid, name, name_search, pkey in people:
        if phi is None:
            value = name_search_keys(name)
            wanted = set(split_keys(value))
        else:
            plain = phi.open(name, column="patients.PatientName", row=pkey)
            value = None
            wanted = sealed_name_keys(phi, name_search_keys(plain))
        if value != name_search:
            renamed.append({"_id": pid, "_v": value})
        have = stored.get(pid, set())
        gone.extend((pid, k) for k in have - wanted)
        new.extend({"key": k, "patient_id": pid} for k in sorted(wanted - have))
    if renamed:
        await _update_rows(conn, patients, renamed, {"_v": ("name_search", sa.Text())})
    for pid, key in gone:
        await conn.execute(
            patient_name_keys.delete().where(
                patient_name_keys.c.patient_id == pid, patient_name_keys.c.key == key
            )
        )
    if new and conn.dialect.name == "sqlite":
        await conn.execute(patient_name_keys.insert(), new)
    elif new:
        # One statement, not one execution per row (see _update_rows).
        v = _unnest(
            {
                "key": ([r["key"] for r in new], sa.Text()),
                "patient_id": ([r["patient_id"] for r in new], sa.Integer()),
            }
        )
        await conn.execute(
            patient_name_keys.insert().from_select(
                ["key", "patient_id"], sa.select(v.c.key, v.c.patient_id)
            )
        )
