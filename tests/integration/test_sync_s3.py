"""Sync against a real S3 server (SeaweedFS) through the S3 and MinIO adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pydicom.data
import pytest

from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import Settings, load_settings
from imaging_gateway.storage.factory import open_store
from imaging_gateway.sync.runner import SyncRunner
from tests.support.indexdump import dump_index
from tests.support.seaweed import SeaweedServer

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CHARSETS = Path(pydicom.data.__file__).parent / "charset_files"


def real_world_objects() -> dict[str, bytes]:
    """Real DICOM files nobody here wrote, malformed ones included, under keys laid out
    by UID so that tree-order and byte-order listings differ ('.' < '/')."""
    objs: dict[str, bytes] = {}
    for n, path in enumerate(sorted([*TEST_FILES.glob("*.dcm"), *CHARSETS.glob("*.dcm")])):
        # 1.2.840.1/x sorts after 1.2.840.1.5/x in byte order, before it in tree order.
        folder = "1.2.840.1" if n % 2 else "1.2.840.1.5"
        objs[f"{folder}/{path.name}"] = path.read_bytes()
    objs["医院/空.dcm"] = b""
    objs["医院 2/readme.txt"] = "不是 DICOM".encode()
    return objs


async def put(store: object, key: str, data: bytes) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield data

    await store.write_stream(key, body())  # type: ignore[attr-defined]


def settings_for(
    tmp_path: Path,
    weed: SeaweedServer,
    bucket: str,
    kind: str,
    *,
    index_url: str | None = None,
    store_extra: str = "",
) -> Settings:
    """Settings syncing ``bucket`` as store "s3" (SQLite index unless ``index_url``);
    ``store_extra`` adds TOML lines to the store's table."""
    cfg = tmp_path / "gateway.toml"
    index_url = index_url or f"sqlite:///{tmp_path / 'index.sqlite3'}"
    cfg.write_text(
        f"""
[gateway]
data_dir = "data"
[index]
url = "{index_url}"
[sync]
page_size = 10
[[stores]]
name = "s3"
kind = "{kind}"
endpoint = "{weed.endpoint}"
bucket = "{bucket}"
access_key_env = "AK"
secret_key_env = "SK"
{store_extra}""",
        encoding="utf-8",
    )
    return load_settings(cfg, environ={"AK": weed.access_key, "SK": weed.secret_key})


@pytest.mark.seaweedfs
@pytest.mark.parametrize("kind", ["s3", "minio"])
async def test_sync_real_files_from_seaweedfs(
    seaweedfs: SeaweedServer, tmp_path: Path, kind: str
) -> None:
    bucket = seaweedfs.make_bucket(f"sync-{kind}")
    settings = settings_for(tmp_path, seaweedfs, bucket, kind)
    objs = real_world_objects()
    store = open_store(settings.store("s3"))
    index = await SqlIndex.open(settings.index)
    try:
        for key, data in objs.items():
            await put(store, key, data)

        async def run(**kw: object) -> dict[str, int]:
            runner = SyncRunner(settings, index, store)
            await runner.start(**kw)  # type: ignore[arg-type]
            job = await runner.run()
            assert job.status == "succeeded"
            return job.counters

        c = await run()
        assert c["listed"] == len(objs)
        assert c["indexed"] + c["quarantined"] == len(objs)
        dump = await dump_index(index)
        quarantined = {k: r for _, k, _, r in dump["quarantine"]}
        assert quarantined["医院/空.dcm"].startswith("empty")
        assert quarantined["医院 2/readme.txt"].startswith("not-dicom")
        assert any(r.startswith("truncated") for r in quarantined.values())
        # Chinese names come out as the right Unicode through the whole path.
        names = {p[2] for p in dump["patients"]}
        assert "Wang^XiaoDong=王^小東" in names
        assert "Wang^XiaoDong=王^小东" in names

        # Unchanged re-run reads nothing and deletes nothing despite tree-order listing.
        c = await run()
        assert (c["unchanged"], c["deleted"], c["bytes_read"]) == (len(objs), 0, 0)
        assert await dump_index(index) == dump

        # Deletions in both folders are found.
        gone = ["1.2.840.1/" + k.split("/")[1] for k in objs if k.startswith("1.2.840.1/")][:2]
        gone += ["1.2.840.1.5/" + k.split("/")[1] for k in objs if k.startswith("1.2.840.1.5/")][:1]
        for key in gone:
            await store.delete(key)
        c = await run()
        assert c["deleted"] == len(gone)
        after = await dump_index(index)
        # Indexed objects leave tombstones; quarantined ones just leave the quarantine.
        assert {k for _, k, _ in after["tombstones"]} == {k for k in gone if k not in quarantined}
        remaining = {r[1] for r in after["instances"]} | {k for _, k, _, _ in after["quarantine"]}
        assert remaining == set(objs) - set(gone)
    finally:
        await store.close()
        await index.close()


@pytest.mark.seaweedfs
async def test_sync_quarantines_objects_cut_inside_their_pixel_data(
    seaweedfs: SeaweedServer, tmp_path: Path, index: SqlIndex
) -> None:
    """pydicom's real files cut short: each is quarantined as truncated, from one 64 KiB
    read, while the whole files beside them are indexed."""
    bucket = seaweedfs.make_bucket("sync-cut")
    settings = settings_for(tmp_path, seaweedfs, bucket, "s3")
    files = {
        "ct": "CT_small.dcm",  # native, 39 KB: read whole
        "palette": "examples_palette.dcm",  # native, 283 KB: a 64 KiB prefix
        "small_j2k": "JPEG2000.dcm",  # encapsulated, empty offset table, read whole
        "j2k": "examples_jpeg2k.dcm",  # encapsulated, one frame in 64 KiB fragments
        "ybr": "examples_ybr_color.dcm",  # encapsulated, 30 frames in a Basic Offset Table
    }
    whole = {name: (TEST_FILES / file).read_bytes() for name, file in files.items()}
    ybr_last_frame = 35040 + 12 + 8 + 120 + max(
        pydicom.encaps.parse_basic_offsets(whole["ybr"][35040 + 12 :])
    )
    cut = {
        "ct": whole["ct"][:-12000],
        "palette": whole["palette"][:-200_000],
        "small_j2k": whole["small_j2k"][:3200],
        "small_j2k_no_delimiter": whole["small_j2k"][:-8],
        # Inside its first 64 KiB fragment, whose item header the first read holds. (A cut
        # in a later fragment shows only at the object's end, which a sync does not read;
        # a retrieve refuses such a frame.)
        "j2k": whole["j2k"][:60_000],
        "ybr": whole["ybr"][: ybr_last_frame - 1000],
    }
    store = open_store(settings.store("s3"))
    try:
        for name, data in whole.items():
            await put(store, f"whole/{name}.dcm", data)
        for name, data in cut.items():
            await put(store, f"cut/{name}.dcm", data)
        runner = SyncRunner(settings, index, store)
        await runner.start()
        job = await runner.run()
        assert job.status == "succeeded"
        # Never more than the first read of each (64 KiB) beyond the small ones.
        assert job.counters["bytes_read"] <= (len(whole) + len(cut)) * 65536
        dump = await dump_index(index)
    finally:
        await store.close()
    quarantined = {k: r for _, k, _, r in dump["quarantine"]}
    assert set(quarantined) == {f"cut/{name}.dcm" for name in cut}, quarantined
    for key, reason in quarantined.items():
        assert reason.startswith("truncated: "), (key, reason)
    assert "pixel data (7FE0,0010)" in quarantined["cut/palette.dcm"]
    assert "Basic Offset Table" in quarantined["cut/ybr.dcm"]
    assert {r[1] for r in dump["instances"]} == {f"whole/{name}.dcm" for name in whole}
