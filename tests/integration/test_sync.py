"""Sync jobs against real stores and real indexes: full, incremental, quarantine, resume."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imaging_gateway.dicom.synthetic import corrupt_samples, generate_instances
from imaging_gateway.errors import StoreUnavailable
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import Settings, load_settings
from imaging_gateway.storage.base import ListPage, ObjectStore, RangeRead
from imaging_gateway.storage.factory import open_store
from imaging_gateway.sync.runner import SyncRunner
from tests.support.indexdump import dump_index

PAGE = 7


def settings_for(
    tmp_path: Path, index_url: str, *, page_size: int = PAGE, store: Path | None = None
) -> Settings:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[gateway]
data_dir = "data"
[index]
url = "{index_url}"
[sync]
page_size = {page_size}
concurrency = 8
[[stores]]
name = "bj"
kind = "fs"
path = "{store or tmp_path / "store"}"
""",
        encoding="utf-8",
    )
    return load_settings(config, environ={})


def corpus() -> dict[str, bytes]:
    objs = {
        i.key: i.data
        for i in generate_instances(seed=11, patients=4, studies_per_patient=2,
                                    pixel_mode="small", instances_per_series=2)
    }
    for key, data, _ in corrupt_samples():
        objs[key] = data
    return objs


def write_store(root: Path, objs: dict[str, bytes]) -> None:
    for key, data in objs.items():
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture
def objs() -> dict[str, bytes]:
    return corpus()


@pytest.fixture
async def env(tmp_path: Path, index_url: str, objs: dict[str, bytes]) -> AsyncIterator[tuple[Settings, SqlIndex]]:
    settings = settings_for(tmp_path, index_url)
    write_store(tmp_path / "store", objs)
    index = await SqlIndex.open(settings.index)
    yield settings, index
    await index.close()


async def sync(settings: Settings, index: SqlIndex, store: ObjectStore | None = None,
               **kw: Any) -> dict[str, int]:
    own = store is None
    store = store or open_store(settings.store("bj"))
    try:
        runner = SyncRunner(settings, index, store)
        await runner.start(**kw)
        job = await runner.run()
        assert job.status == "succeeded"
        return job.counters
    finally:
        if own:
            await store.close()


async def test_full_then_incremental(env: tuple[Settings, SqlIndex], objs: dict[str, bytes],
                                     tmp_path: Path) -> None:
    settings, index = env
    n_bad = len(corrupt_samples())
    c = await sync(settings, index)
    assert c["listed"] == len(objs)
    assert (c["indexed"], c["quarantined"], c["unchanged"]) == (len(objs) - n_bad, n_bad, 0)
    stats = await index.stats()
    assert stats["instances"] == len(objs) - n_bad and stats["quarantined"] == n_bad
    assert stats["patients"] >= 4 and stats["studies"] == 8

    # Quarantine keeps each bad object with its reason.
    dump = await dump_index(index)
    reasons = {k: r for _, k, _, r in dump["quarantine"]}
    for key, _, prefix in corrupt_samples():
        assert reasons[key].startswith(prefix), (key, reasons[key])

    # Nothing changed: nothing is read.
    c = await sync(settings, index)
    assert (c["unchanged"], c["indexed"], c["bytes_read"]) == (len(objs) - 0, 0, 0)
    assert await dump_index(index) == dump

    # One object rewritten, one deleted, one added: only those are touched.
    keys = sorted(k for k in objs if k.endswith(".dcm") and k not in reasons)
    changed, deleted = keys[0], keys[1]
    (tmp_path / "store" / changed).write_bytes(objs[keys[2]])  # now a copy of another
    (tmp_path / "store" / deleted).unlink()
    (tmp_path / "store" / "zzz" / "new.dcm").parent.mkdir()
    (tmp_path / "store" / "zzz" / "new.dcm").write_bytes(objs[keys[3]])
    c = await sync(settings, index)
    assert (c["indexed"], c["deleted"], c["unchanged"]) == (2, 1, len(objs) - 2)
    after = await index.stats()
    assert after["tombstones"] == 1
    assert after["instances"] == stats["instances"]
    # Identical copies of an instance under other keys are replicas, not conflicts.
    assert after["conflicts"] == 0

    # A full sync re-reads everything and changes nothing.
    before = await dump_index(index)
    c = await sync(settings, index, mode="full")
    assert c["indexed"] == after["instances"] and c["unchanged"] == 0
    assert await dump_index(index) == before


async def test_conflicting_instances_both_kept(env: tuple[Settings, SqlIndex], tmp_path: Path,
                                               objs: dict[str, bytes]) -> None:
    import io

    import pydicom

    settings, index = env
    key = sorted(k for k in objs if k.endswith(".dcm") and len(objs[k]) > 1000)[0]
    ds = pydicom.dcmread(io.BytesIO(objs[key]))
    ds.StudyDescription = "a different object claiming the same SOPInstanceUID"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    (tmp_path / "store" / "dup").mkdir()
    (tmp_path / "store" / "dup" / "same-uid.dcm").write_bytes(buf.getvalue())
    await sync(settings, index)
    dump = await dump_index(index)
    sop = str(ds.SOPInstanceUID)
    assert [r[1] for r in dump["instances"] if r[4] == sop] == sorted([key, "dup/same-uid.dcm"])
    assert [c[0] for c in dump["conflicts"]] == [sop]
    assert dump["conflicts"][0][3] in ("different-size", "different-content")


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs, no cleanup of ours."""


class CrashingStore:
    """Wraps a real store and dies after a given number of calls."""

    def __init__(self, inner: ObjectStore, after_calls: int, exc: BaseException) -> None:
        self.inner = inner
        self.name = inner.name
        self.left = after_calls
        self.exc = exc

    def _tick(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise self.exc

    async def list_page(self, **kw: Any) -> ListPage:
        self._tick()
        return await self.inner.list_page(**kw)

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        self._tick()
        return await self.inner.read_range(key, offset, length)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_resume_after_dying_anywhere_gives_the_same_index(
    tmp_path: Path, index_url: str, objs: dict[str, bytes]
) -> None:
    if index_url.startswith("postgresql"):
        cut_points = [3, 29]
    else:
        cut_points = [1, 3, 9, 17, 29, 41]
    write_store(tmp_path / "store", objs)
    reference_settings = settings_for(tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.sqlite3'}")
    ref_index = await SqlIndex.open(reference_settings.index)
    real = open_store(settings_for(tmp_path, index_url).store("bj"))
    try:
        await sync(reference_settings, ref_index, real)
        expected = await dump_index(ref_index)
        await ref_index.close()
        for n, cut in enumerate(cut_points):
            settings = settings_for(tmp_path / f"run{n}", index_url)
            if index_url.startswith("sqlite"):
                settings = settings_for(tmp_path / f"run{n}",
                                        f"sqlite:///{tmp_path / f'run{n}.sqlite3'}")
            index = await SqlIndex.open(settings.index)
            try:
                if n and index_url.startswith("postgresql"):
                    await _reset(index)
                runner = SyncRunner(settings, index, CrashingStore(real, cut, Crash()))  # type: ignore[arg-type]
                await runner.start()
                with pytest.raises(Crash):
                    await runner.run()
                job = await index.open_job("bj")
                assert job is not None and job.status in ("running", "failed")
                resumed = await sync(settings, index, real)
                assert resumed["listed"] == len(objs)  # counters carry over the checkpoint
                assert await dump_index(index) == expected, f"cut at call {cut}"
            finally:
                await index.close()
    finally:
        await real.close()


async def _reset(index: SqlIndex) -> None:
    from imaging_gateway.index.schema import metadata

    async with index.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            await conn.execute(table.delete())


async def test_store_failure_fails_the_job_then_resumes(env: tuple[Settings, SqlIndex],
                                                        objs: dict[str, bytes]) -> None:
    settings, index = env
    real = open_store(settings.store("bj"))
    try:
        runner = SyncRunner(settings, index, CrashingStore(
            real, 20, StoreUnavailable("store 'bj': endpoint unreachable after 5 retries")))  # type: ignore[arg-type]
        job = await runner.start()
        with pytest.raises(StoreUnavailable):
            await runner.run()
        failed = await index.get_job(job.id)
        assert failed.status == "failed" and "unreachable" in (failed.error or "")
        assert failed.cursor is not None  # pages before the failure landed
        c = await sync(settings, index, real)
        assert c["listed"] == len(objs)
        assert (await index.get_job(job.id)).status == "succeeded"  # the same job finished
    finally:
        await real.close()


async def test_second_job_on_same_store_is_refused_on_sqlite_joined_on_postgres(
    env: tuple[Settings, SqlIndex], objs: dict[str, bytes], tmp_path: Path
) -> None:
    """SQLite serves one process: a second worker of a store is refused. On PostgreSQL
    a second worker joins the running job, and the two end with one worker's index."""
    from imaging_gateway.errors import Conflict

    settings, index = env
    store = open_store(settings.store("bj"))
    try:
        first = SyncRunner(settings, index, store)
        job = await first.start()
        if index.dialect != "postgresql":
            with pytest.raises(Conflict):
                await SyncRunner(settings, index, store).start()
            await first.run()
            return
        second = SyncRunner(settings, index, store)
        assert (await second.start()).id == job.id  # the same job, not a second one
        done = await asyncio.gather(first.run(), second.run())
        assert [j.status for j in done] == ["succeeded", "succeeded"]
        assert done[0].counters["listed"] == len(objs)
        assert done[0].counters == done[1].counters
        ref_settings = settings_for(
            tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.sqlite3'}", store=tmp_path / "store"
        )
        ref = await SqlIndex.open(ref_settings.index)
        try:
            assert done[0].counters == await sync(ref_settings, ref)
            assert await dump_index(index) == await dump_index(ref)
        finally:
            await ref.close()
    finally:
        await store.close()


def test_sigkill_mid_job_then_cli_resume(tmp_path: Path, index_url: str,
                                         objs: dict[str, bytes]) -> None:
    """A real process killed with SIGKILL; the same command resumes to the same index.

    The first run's store stalls for good after a few header reads
    (``tests.support.stalled_sync``), so it is always killed mid-job, after a checkpoint
    and before its end, however fast or loaded the machine.
    """
    import json
    import signal
    import subprocess
    import sys
    import time

    settings = settings_for(tmp_path, index_url, page_size=2)
    write_store(tmp_path / "store", objs)
    config = tmp_path / "gateway.toml"
    args = ["sync", "--config", str(config), "--store", "bj", "--json", "--no-progress"]
    repo = Path(__file__).resolve().parents[2]
    slow_env = {**os.environ, "IMAGING_GATEWAY_SYNC__CONCURRENCY": "1"}
    stalled = subprocess.Popen([sys.executable, "-m", "tests.support.stalled_sync", "6", *args],
                               cwd=repo, env=slow_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)

    async def checkpoint() -> tuple[str | None, int]:
        index = await SqlIndex.open(settings.index)
        try:
            job = await index.open_job("bj")
            return (job.cursor, job.counters.get("listed", 0)) if job else (None, 0)
        finally:
            await index.close()

    try:
        # Stalled, the process cannot end by itself: it is killed once a page has landed.
        while (cursor := asyncio.run(checkpoint()))[0] is None:
            assert stalled.poll() is None, stalled.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
    finally:
        stalled.send_signal(signal.SIGKILL)
        stalled.wait()
    assert stalled.returncode == -signal.SIGKILL
    assert 0 < cursor[1] < len(objs)  # killed mid-job: some pages in, not all

    cmd = [sys.executable, "-m", "imaging_gateway", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["status"] == "succeeded" and summary["listed"] == len(objs)

    async def compare() -> None:
        index = await SqlIndex.open(settings.index)
        ref_settings = settings_for(
            tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.sqlite3'}", store=tmp_path / "store"
        )
        ref = await SqlIndex.open(ref_settings.index)
        try:
            await sync(ref_settings, ref)
            assert await dump_index(index) == await dump_index(ref)
        finally:
            await index.close()
            await ref.close()

    asyncio.run(compare())


class RewritingStore:
    """A real fs store whose object ``key`` is rewritten right after its first ranged read."""

    def __init__(self, inner: ObjectStore, root: Path, key: str, new: bytes) -> None:
        self.inner, self.root, self.key, self.new = inner, root, key, new
        self.name = inner.name
        self.done = False

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        got = await self.inner.read_range(key, offset, length)
        if key == self.key and not self.done:
            self.done = True
            (self.root / key).write_bytes(self.new)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_object_rewritten_while_its_header_is_read(tmp_path: Path, objs: dict[str, bytes]) -> None:
    import io

    import pydicom

    write_store(tmp_path / "store", objs)
    config = settings_for(tmp_path, f"sqlite:///{tmp_path / 'i.sqlite3'}")
    # A first read shorter than the headers forces a second ranged read.
    from dataclasses import replace

    settings = replace(config, sync=replace(config.sync, header_read_bytes=1024))
    bad = {k for k, _, _ in corrupt_samples()}
    key, other = sorted(k for k in objs if k not in bad)[:2]
    index = await SqlIndex.open(settings.index)
    real = open_store(settings.store("bj"))
    try:
        await sync(settings, index, RewritingStore(real, tmp_path / "store", key, objs[other]))  # type: ignore[arg-type]
        dump = await dump_index(index)
        row = next(r for r in dump["instances"] if r[1] == key)
        new_sop = str(pydicom.dcmread(io.BytesIO(objs[other]), stop_before_pixels=True).SOPInstanceUID)
        # What is indexed is the new content, with the new version's ETag.
        assert row[4] == new_sop
        assert row[2] == (await real.stat(key)).etag
    finally:
        await real.close()
        await index.close()
