"""Index synthetic instances through the real parse + apply_page path (no store needed)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime

from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.dicom.synthetic import SyntheticInstance
from imaging_gateway.index.sql import IndexedObject, SqlIndex

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


async def index_instances(
    index: SqlIndex,
    corpus: Sequence[SyntheticInstance],
    *,
    store: str = "s1",
    province: str = "110000",
    hospital: str | None = None,
) -> None:
    """Parse each instance's header and land them all as one page of a finished job."""
    objs = []
    for inst in corpus:
        header = parse_header(inst.data, complete=True)
        digest = hashlib.sha256(inst.data[: header.header_bytes]).hexdigest()
        etag = hashlib.md5(inst.data, usedforsecurity=False).hexdigest()
        objs.append(IndexedObject(inst.key, etag, len(inst.data), T0, header, digest))
    job = await index.create_job(store, "full")
    await index.apply_page(
        store=store,
        province=province,
        hospital=hospital,
        job_id=job.id,
        indexed=objs,
        quarantined=[],
        deleted=[],
        cursor=max(o.key for o in objs) if objs else None,
        counters={},
    )
    await index.set_job_status(job.id, "succeeded", finished=True)
