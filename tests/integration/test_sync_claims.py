"""Sync slices claimed in the index: leases (injected clock), takeover, landing checks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from imaging_gateway.errors import Conflict, SliceLost
from imaging_gateway.index.schema import instances
from imaging_gateway.index.sql import ListedObject, SqlIndex, worker_lock_key
from imaging_gateway.settings import IndexSettings
from tests.conftest import create_pg_database
from tests.integration.test_index import obj
from tests.support.postgres import drop_database

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def land(index: SqlIndex, job: str, claim: object, key: str) -> int:
    return await index.apply_page(
        store="s1", province="110000", job_id=job, indexed=[obj(key)], quarantined=[],
        deleted=[], cursor=None, counters={"listed": 1, "indexed": 1},
        claim=claim,  # type: ignore[arg-type]
    )


async def keys(index: SqlIndex) -> list[str]:
    async with index.engine.connect() as conn:
        return sorted((await conn.execute(sa.select(instances.c.key))).scalars())


async def test_lease_renewed_then_expired_hands_the_slice_over(index: SqlIndex) -> None:
    job, created = await index.create_or_join_job("s1", "full")
    assert created
    assert (await index.create_or_join_job("s1", "incremental")) == (job, False)  # joined
    listed = [ListedObject("a.dcm", "e1", 1000, T0)]
    assert await index.add_slice(job.id, 0, after_key=None, objects=listed, final=True)
    # A second worker listing the same page at once: the first one recorded is kept.
    assert not await index.add_slice(job.id, 0, after_key=None, objects=[], final=True)
    assert await index.next_listing(job.id) is None  # the final page is a slice

    async with index.sync_worker("A"), index.sync_worker("B"):
        a = await index.claim_slice(job.id, "A", now=T0, lease_s=30, exclusive=False)
        assert a is not None and a.objects == listed and a.final and a.attempts == 1
        assert await index.claim_slice(job.id, "B", now=at(29), lease_s=30, exclusive=False) is None
        assert await index.renew_claims(job.id, "A", until=at(50)) == 1
        # Renewed: still A's after its first lease would have ended.
        assert await index.claim_slice(job.id, "B", now=at(40), lease_s=30, exclusive=False) is None
        b = await index.claim_slice(job.id, "B", now=at(51), lease_s=30, exclusive=False)
        assert b is not None and b.claim.seq == 0 and b.attempts == 2
        # A, too slow, lands nothing: the slice is B's now.
        with pytest.raises(SliceLost):
            await land(index, job.id, a.claim, "a.dcm")
        assert await keys(index) == []
        assert await index.renew_claims(job.id, "A", until=at(90)) == 0
        await land(index, job.id, b.claim, "a.dcm")
        assert await keys(index) == ["a.dcm"]
        with pytest.raises(SliceLost):  # landed once only
            await land(index, job.id, b.claim, "a.dcm")
    assert await index.slices_left(job.id) == 0
    got = await index.get_job(job.id)
    assert got.counters == {"listed": 1, "indexed": 1, "conflicts": 0}
    assert got.cursor == "a.dcm"  # the checkpoint: the last key of the slices landed
    assert await index.finish_job(job.id)
    assert (await index.get_job(job.id)).status == "succeeded"
    # A worker that comes late finds nothing to do.
    assert await index.claim_slice(job.id, "C", now=at(60), lease_s=30, exclusive=False) is None


async def test_checkpoint_stops_at_the_first_slice_not_landed(index: SqlIndex) -> None:
    job, _ = await index.create_or_join_job("s1", "full")
    for seq, key in enumerate(["a.dcm", "b.dcm", "c.dcm"]):
        page = [ListedObject(key, "e1", 1000, T0)]
        await index.add_slice(job.id, seq, after_key=None, objects=page, final=seq == 2)
    claims = [
        await index.claim_slice(job.id, "A", now=T0, lease_s=30, exclusive=False) for _ in range(3)
    ]
    assert [c.claim.seq for c in claims if c] == [0, 1, 2]
    assert claims[0] and claims[1] and claims[2]
    await land(index, job.id, claims[0].claim, "a.dcm")
    await land(index, job.id, claims[2].claim, "c.dcm")
    assert (await index.get_job(job.id)).cursor == "a.dcm"
    assert not await index.finish_job(job.id)  # slice 1 is not in yet
    await land(index, job.id, claims[1].claim, "b.dcm")
    assert (await index.get_job(job.id)).cursor == "c.dcm"
    assert (await index.get_job(job.id)).counters["listed"] == 3
    assert await index.finish_job(job.id)


async def test_exclusive_worker_takes_over_any_claim_and_abandoned_job_stops(
    index: SqlIndex,
) -> None:
    """SQLite's single worker holds the store alone (lock file): any claim it finds is a
    dead process's, whatever its lease says."""
    job, _ = await index.create_or_join_job("s1", "full")
    await index.add_slice(
        job.id, 0, after_key=None, objects=[ListedObject("a.dcm", "e1", 1, T0)], final=True
    )
    assert await index.claim_slice(job.id, "dead", now=T0, lease_s=3600, exclusive=False)
    took = await index.claim_slice(job.id, "solo", now=at(1), lease_s=30, exclusive=True)
    assert took is not None and took.claim.worker == "solo"
    await index.set_job_status(job.id, "abandoned", finished=True)
    with pytest.raises(Conflict):  # not SliceLost: the whole job is gone
        await land(index, job.id, took.claim, "a.dcm")
    with pytest.raises(Conflict):
        await index.claim_slice(job.id, "solo", now=at(2), lease_s=30, exclusive=True)
    # A worker's failure never overwrites what another recorded at the end.
    await index.set_job_status(job.id, "failed", error="x", if_open=True)
    assert (await index.get_job(job.id)).status == "abandoned"


async def test_dead_worker_session_frees_its_slices_at_once() -> None:
    """PostgreSQL: a worker whose session ends (its process killed) loses its claims
    at once, long before its lease would end."""
    url = await create_pg_database()
    a_index = await SqlIndex.open(IndexSettings(url=url))
    b_index = await SqlIndex.open(IndexSettings(url=url), migrate=False)
    try:
        job, _ = await a_index.create_or_join_job("s1", "full")
        await a_index.add_slice(
            job.id, 0, after_key=None, objects=[ListedObject("a.dcm", "e1", 1, T0)], final=True
        )
        async with b_index.sync_worker("B"):
            async with a_index.sync_worker("A"):
                assert await a_index.claim_slice(job.id, "A", now=T0, lease_s=600, exclusive=False)
                assert (
                    await b_index.claim_slice(job.id, "B", now=at(1), lease_s=600, exclusive=False)
                    is None
                )
                # A's session dies as with SIGKILL: no unlock, no goodbye.
                key = worker_lock_key("A") & 0xFFFFFFFFFFFFFFFF
                async with b_index.engine.begin() as conn:
                    killed = await conn.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_locks "
                            "WHERE locktype = 'advisory' AND granted "
                            "AND classid = :hi AND objid = :lo"
                        ),
                        {"hi": key >> 32, "lo": key & 0xFFFFFFFF},
                    )
                    assert killed.scalars().all() == [True]
                # pg_terminate_backend only signals: the lock goes when the backend exits.
                for _ in range(500):
                    async with b_index.engine.connect() as conn:
                        held = (await conn.execute(sa.text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND granted AND classid = :hi AND objid = :lo"),
                            {"hi": key >> 32, "lo": key & 0xFFFFFFFF})).scalar_one()
                    if not held:
                        break
                    await asyncio.sleep(0.02)
                took = await b_index.claim_slice(
                    job.id, "B", now=at(2), lease_s=600, exclusive=False
                )
                assert took is not None and took.claim.worker == "B" and took.attempts == 2
    finally:
        await a_index.close()
        await b_index.close()
        await drop_database(url)


async def test_job_checkpointed_before_slices_lists_on_from_its_cursor(index: SqlIndex) -> None:
    """A job left unfinished by a gateway before 0009 (a cursor, no slices) goes on
    listing after its cursor; the keys before it were marked seen by it then."""
    job = await index.create_job("s1", "full")
    await index.apply_page(store="s1", province="110000", job_id=job.id, indexed=[obj("a.dcm")],
                           quarantined=[], deleted=[], cursor="a.dcm", counters={"listed": 1})
    assert await index.next_listing(job.id) == (0, "a.dcm")
    joined, created = await index.create_or_join_job("s1", "incremental")
    assert joined.id == job.id and not created and joined.mode == "full"
