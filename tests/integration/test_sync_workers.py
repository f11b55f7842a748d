"""Several real `imaging-gateway sync` processes on one store (SeaweedFS) and one
PostgreSQL index: they split the job's slices, end with exactly one worker's index, and
one killed by SIGKILL mid-slice leaves its slices to the other."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from imaging_gateway.index.schema import sync_slices
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import Settings
from imaging_gateway.storage.factory import open_store
from imaging_gateway.sync.runner import SyncRunner
from tests.conftest import create_pg_database
from tests.integration.test_sync import corpus
from tests.integration.test_sync_s3 import put, real_world_objects, settings_for
from tests.support.indexdump import dump_index
from tests.support.postgres import drop_database
from tests.support.seaweed import SeaweedServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await create_pg_database()
    yield url
    await drop_database(url)


async def world(
    seaweedfs: SeaweedServer, tmp_path: Path, bucket: str, pg_url: str
) -> tuple[Settings, dict[str, str], dict[str, bytes]]:
    """A bucket of real and synthetic objects (~15 slices of 10), its gateway config."""
    settings = settings_for(tmp_path, seaweedfs, bucket, "s3", index_url=pg_url)
    objs = {**real_world_objects(), **{f"synthetic/{k}": v for k, v in corpus().items()}}
    store = open_store(settings.store("s3"))
    try:
        for key, data in objs.items():
            await put(store, key, data)
    finally:
        await store.close()
    env = {**os.environ, "AK": seaweedfs.access_key, "SK": seaweedfs.secret_key}
    return settings, env, objs


async def one_worker_index(
    seaweedfs: SeaweedServer, tmp_path: Path, bucket: str
) -> tuple[dict[str, int], dict[str, list[tuple[object, ...]]]]:
    """What one worker alone makes of the bucket (SQLite index): counters and rows."""
    (tmp_path / "ref").mkdir()
    ref_settings = settings_for(tmp_path / "ref", seaweedfs, bucket, "s3")
    ref = await SqlIndex.open(ref_settings.index)
    store = open_store(ref_settings.store("s3"))
    try:
        runner = SyncRunner(ref_settings, ref, store)
        await runner.start()
        job = await runner.run()
        assert job.status == "succeeded"
        return job.counters, await dump_index(ref)
    finally:
        await store.close()
        await ref.close()


def sync_args(tmp_path: Path) -> list[str]:
    return ["sync", "--config", str(tmp_path / "gateway.toml"), "--store", "s3", "--json",
            "--no-progress"]


async def finish(proc: asyncio.subprocess.Process) -> dict[str, object]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    summary: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return summary


async def slices(index: SqlIndex) -> list[tuple[int, str, str | None, int]]:
    t = sync_slices.c
    async with index.engine.connect() as conn:
        q = sa.select(t.seq, t.state, t.claimed_by, t.attempts).order_by(t.seq)
        return [tuple(r) for r in (await conn.execute(q)).all()]  # type: ignore[misc]


@pytest.mark.seaweedfs
async def test_two_sync_processes_end_with_one_workers_index(
    seaweedfs: SeaweedServer, tmp_path: Path, pg_url: str
) -> None:
    bucket = seaweedfs.make_bucket("workers-two")
    settings, env, objs = await world(seaweedfs, tmp_path, bucket, pg_url)
    cmd = [sys.executable, "-m", "imaging_gateway", *sync_args(tmp_path)]
    # Started together on a database nobody migrated yet: they migrate in turn.
    procs = [await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE,
                                                  stderr=asyncio.subprocess.PIPE)
             for _ in range(2)]
    try:
        summaries = [await finish(p) for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert summaries[0]["job"] == summaries[1]["job"]  # one job, two workers
    assert [s["status"] for s in summaries] == ["succeeded", "succeeded"]
    index = await SqlIndex.open(settings.index, migrate=False)
    try:
        counters, expected = await one_worker_index(seaweedfs, tmp_path, bucket)
        job = await index.get_job(str(summaries[0]["job"]))
        assert job.counters == counters  # each object counted once, whoever read it
        assert job.counters["listed"] == len(objs)
        assert await dump_index(index) == expected
        assert all(state == "done" for _, state, _, _ in await slices(index))
    finally:
        await index.close()


@pytest.mark.seaweedfs
async def test_worker_killed_mid_slice_leaves_it_to_the_other(
    seaweedfs: SeaweedServer, tmp_path: Path, pg_url: str
) -> None:
    """Worker A's store stalls for good after 15 header reads (one slice and a half), so
    it is always killed mid-slice, holding claims; worker B, running meanwhile, takes
    A's slices over once A is killed (its session gone) and finishes the job."""
    bucket = seaweedfs.make_bucket("workers-kill")
    settings, env, objs = await world(seaweedfs, tmp_path, bucket, pg_url)
    # Leases far longer than the test may take: only A's session ending frees its slices.
    env["IMAGING_GATEWAY_SYNC__LEASE_S"] = "3600"
    index = await SqlIndex.open(settings.index)
    stalled = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.stalled_sync", "15", *sync_args(tmp_path),
        cwd=REPO, env={**env, "IMAGING_GATEWAY_SYNC__CONCURRENCY": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    other: asyncio.subprocess.Process | None = None
    try:
        # A has landed a slice and holds the next ones, stalled in them.
        while True:
            assert stalled.returncode is None
            now = await slices(index)
            held = {w for _, state, w, _ in now if state == "claimed"}
            if any(state == "done" for _, state, _, _ in now) and held:
                break
            await asyncio.sleep(0.05)
        (a_worker,) = held
        a_slices = [seq for seq, state, w, _ in now if state == "claimed" and w == a_worker]
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imaging_gateway", *sync_args(tmp_path), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        # B is at work (it holds or landed a slice of its own) before A dies.
        while not any(w not in (None, a_worker) for _, _, w, _ in await slices(index)):
            assert other.returncode is None
            await asyncio.sleep(0.05)
        stalled.send_signal(signal.SIGKILL)
        await stalled.wait()
        assert stalled.returncode == -signal.SIGKILL
        summary = await finish(other)
        assert summary["status"] == "succeeded" and summary["listed"] == len(objs)
        after = {seq: (state, w, n) for seq, state, w, n in await slices(index)}
        for seq in a_slices:  # A's slices were landed by B, on a second attempt
            state, worker, attempts = after[seq]
            assert state == "done" and worker not in (None, a_worker) and attempts == 2
        counters, expected = await one_worker_index(seaweedfs, tmp_path, bucket)
        assert (await index.get_job(str(summary["job"]))).counters == counters
        assert await dump_index(index) == expected
    finally:
        for proc in (stalled, other):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        await index.close()
