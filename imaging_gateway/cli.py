"""Command line: serve | sync | index | tokens | keys | federation | seal | seal-index | audit |
demo. Thin."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from imaging_gateway.errors import ConfigError, GatewayError
from imaging_gateway.settings import Settings, load_settings

log = logging.getLogger("imaging_gateway")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imaging-gateway",
        description="Provincial DICOM imaging gateway: study index, DICOMweb, federation.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        type=Path,
        default=None,
        help="gateway.toml (default: embedded defaults; IMAGING_GATEWAY_* override keys)",
    )
    # Also accepted after a sub-subcommand; SUPPRESS keeps it from resetting a value
    # given before it (`index --config X stats`).
    config_again = argparse.ArgumentParser(add_help=False)
    config_again.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="as above")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[config])

    cmd("serve", "run the HTTP server")

    s = cmd("sync", "index one object store (resumes an unfinished job of that store)")
    s.add_argument("--store", required=True, help="name of a [[stores]] entry")
    s.add_argument("--full", action="store_true", help="re-read every header, not only changes")
    s.add_argument("--restart", action="store_true", help="abandon an unfinished job, start anew")
    s.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = cmd("index", "study index maintenance")
    isub = i.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    st = isub.add_parser(
        "stats", help="counts of patients, studies, series, instances, ...", parents=[config_again]
    )
    st.add_argument("--json", action="store_true")
    isub.add_parser(
        "migrate", help="bring the schema to the newest version", parents=[config_again]
    )
    jobs = isub.add_parser("jobs", help="recent sync jobs", parents=[config_again])
    jobs.add_argument("--store", default=None)
    jobs.add_argument("--json", action="store_true")
    quar = isub.add_parser(
        "quarantine", help="objects a sync could not index, with the reason",
        parents=[config_again],
    )
    quar.add_argument("--store", default=None, help="only this store's")
    quar.add_argument("--json", action="store_true", help="a JSON array")

    t = cmd("tokens", "bearer tokens")
    tsub = t.add_subparsers(dest="tokens_command", required=True, metavar="SUBCOMMAND")
    ti = tsub.add_parser(
        "issue", help="issue a signed token (printed on stdout)", parents=[config_again]
    )
    ti.add_argument("--role", required=True, choices=["admin", "hospital", "peer", "patient"])
    ti.add_argument("--hospital", default=None, help="institution code, for role hospital")
    ti.add_argument(
        "--national-id", default=None, help="GB 11643 identity number, for role patient"
    )
    ti.add_argument("--subject", default=None, help="who holds it (default: the role)")
    ti.add_argument("--ttl", default="1d", help="lifetime: 3600, 30m, 12h, 7d (default 1d)")

    k = cmd("keys", "key-encryption keys of encryption at rest (the keyring file)")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    ki = ksub.add_parser(
        "init", help="create the keyring (version 1) at encryption.keyring_file",
        parents=[config_again],
    )
    ki.add_argument(
        "--suite", choices=["AES-256-GCM", "SM4-GCM"], default=None,
        help="suite of the keyring (default: encryption.suite)",
    )
    ksub.add_parser(
        "rotate", help="add a new key version and make it current", parents=[config_again]
    )
    ks = ksub.add_parser(
        "status", help="key id, suite, versions, current (no key material)",
        parents=[config_again],
    )
    ks.add_argument("--stores", action="store_true", help="also each store's last rewrap")
    ks.add_argument("--json", action="store_true")
    kr = ksub.add_parser(
        "rewrap",
        help="move every data key of a store to the current version (reads headers only)",
        parents=[config_again],
    )
    kr.add_argument("--store", required=True, help="name of a [[stores]] entry")
    kr.add_argument("--concurrency", type=int, default=16)
    kt = ksub.add_parser(
        "retire",
        help="delete an old key version once every store was rewrapped past it",
        parents=[config_again],
    )
    kt.add_argument("version", type=int)
    kt.add_argument(
        "--force", action="store_true",
        help="skip the check of the stores' rewrap records (objects under it become unreadable)",
    )

    f = cmd("federation", "cross-province federation")
    fsub = f.add_subparsers(dest="federation_command", required=True, metavar="SUBCOMMAND")
    fsub.add_parser(
        "public-key",
        help="print the public key of federation.signing_key_file (created if absent), "
        "for the peers' public_key_file",
        parents=[config_again],
    )

    si = cmd(
        "seal-index",
        "encrypt the PHI columns of an index built without encryption, in place "
        "(resumable; needs [encryption] enabled)",
    )
    si.add_argument("--batch", type=int, default=500, help="rows per transaction")

    se = cmd("seal", "encrypt the plain objects of a store in place (resumable)")
    se.add_argument("--store", required=True, help="name of a [[stores]] entry")
    se.add_argument("--concurrency", type=int, default=4)

    a = cmd("audit", "the tamper-evident access log")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    av = asub.add_parser(
        "verify",
        help="check the hash chain; exit 1 naming the first broken record",
        parents=[config_again],
    )
    av.add_argument("--json", action="store_true")
    av.add_argument(
        "--anchor",
        default=None,
        metavar="SEQ:HASH",
        help="a head printed by an earlier verify, kept elsewhere: also fail if it is gone",
    )
    ae = asub.add_parser(
        "export",
        help="write DICOM PS3.15 A.5 audit messages, one XML document per line",
        parents=[config_again],
    )
    ae.add_argument("--out", type=Path, required=True, help="file to write")
    ae.add_argument("--since", default=None, help="ISO 8601 time, inclusive (UTC if no offset)")
    ae.add_argument("--until", default=None, help="ISO 8601 time, exclusive (UTC if no offset)")

    d = sub.add_parser(
        "demo",
        help="generate synthetic studies, index them and serve (zero set-up)",
        description="generate synthetic studies into a local store, index them, serve",
    )
    d.add_argument("--dir", type=Path, default=Path("demo-data"), help="where the demo lives")
    d.add_argument("--patients", type=int, default=20)
    d.add_argument("--listen", default="127.0.0.1:8080")
    d.add_argument("--no-serve", action="store_true", help="stop after indexing")
    d.add_argument(
        "--federation",
        action="store_true",
        help="three provinces (110000, 310000, 440000) as three processes on --listen's "
        "port and the next two, federated; shows a cross-province search and retrieve",
    )
    return p


def _ttl_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise GatewayError(f"--ttl: expected a number with s, m, h or d, got {text!r}") from None


def configure_logging() -> None:
    """Log to stderr; keep libraries that echo DICOM values (PHI) or chatter quiet."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_loggers()


def quiet_loggers() -> None:
    """Keep the libraries that echo DICOM values (PHI) or chatter quiet."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pydicom's warnings quote element values, which can be names or birth dates.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def tune_gc() -> None:
    """Collect reference cycles less often, and never scan what startup loaded.

    Parsing headers allocates many short-lived containers; at Python's default gen-0
    threshold (700) cycle collection took ~7% of a sync job's CPU (measured with
    ``gc.callbacks`` over 4,000 objects: 0.28 s). At 20,000 it took 0.02 s but the
    garbage left between collections raised an incremental sync's peak RSS over 100k
    objects by ~25 MiB; 5,000 keeps most of the gain and the memory flat
    (``bench/sync.py --scale``).
    """
    gc.freeze()
    gc.set_threshold(5_000, 10, 10)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imaging-gateway`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging()
    tune_gc()
    try:
        if args.command == "demo" and args.federation:
            from imaging_gateway.demo_federation import run_federation_demo

            return run_federation_demo(
                args.dir, patients=args.patients, listen=args.listen, serve=not args.no_serve
            )
        if args.command == "demo":
            from imaging_gateway.demo import run_demo

            return run_demo(
                args.dir,
                patients=args.patients,
                listen=args.listen,
                serve=None if args.no_serve else _serve,
            )
        settings = load_settings(args.config)
        prepare_data_dir(settings)
        if args.command == "serve":
            return _serve(settings)
        if args.command == "tokens":
            return _tokens(settings, args)
        if args.command == "federation":
            return _federation_public_key(settings)
        if args.command == "keys" and args.keys_command in {"init", "rotate"}:
            return _keys_local(settings, args)
        if args.command in {"keys", "seal"}:
            return asyncio.run(_keys_stores(settings, args))
        return asyncio.run(_async_command(settings, args))
    except GatewayError as exc:
        print(f"imaging-gateway: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "config-error" else 1
    except KeyboardInterrupt:
        print("imaging-gateway: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def prepare_data_dir(settings: Settings) -> None:
    """Create ``gateway.data_dir`` (the gateway's own folder) and check it takes files.

    Raises ``ConfigError`` naming ``gateway.data_dir`` and the cause when it cannot be
    created or written (a path under a regular file, a read-only mount, no permission).
    """
    path = settings.gateway.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            "gateway.data_dir", f"cannot create or write {path}: {exc.strerror or exc}"
        ) from None


def _serve(settings: Settings) -> int:
    from aiohttp import web

    from imaging_gateway.api.logging import SafeAccessLogger
    from imaging_gateway.api.server import serve
    from imaging_gateway.app import create_app
    from imaging_gateway.crypto.tls import is_loopback, server_context

    host, port = settings.gateway.listen_host, settings.gateway.listen_port
    # Built before the app so a bad certificate or key stops start-up with one line.
    ssl_context = server_context(settings.tls) if settings.tls.enabled else None
    scheme = "http" if ssl_context is None else "https"
    if ssl_context is None and not is_loopback(host):
        log.warning(
            "serving plain HTTP on %s, which is not a loopback address: tokens and patient "
            "data cross the network unencrypted; set [tls] cert_file and key_file",
            host,
        )
    if settings.tls.client_cert_routes:
        log.info("client certificates required on: %s", ", ".join(settings.tls.client_cert_routes))
    app = create_app(settings)
    app.on_startup.append(_freeze_startup_heap)
    # Not web.run_app: its runner answers malformed requests in text quoting them and
    # logs their bytes (api.server).
    try:
        asyncio.run(
            serve(
                app,
                host=host,
                port=port,
                ssl_context=ssl_context,
                access_log_class=SafeAccessLogger,
                on_serving=lambda: log.info("serving on %s://%s:%d", scheme, host, port),
            )
        )
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    except OSError as exc:
        # Binding the listening socket is the only OSError serve lets out on purpose.
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                "gateway.listen", f"{host}:{port} is already in use (another process listens there)"
            ) from None
        if exc.errno in {errno.EADDRNOTAVAIL, errno.EACCES}:
            raise ConfigError(
                "gateway.listen", f"cannot listen on {host}:{port}: {os.strerror(exc.errno)}"
            ) from None
        raise
    return 0


async def _freeze_startup_heap(_app: object) -> None:
    """Keep what start-up built (the ~120k objects ``serve`` imports after ``main``
    froze the heap, the open index, caches) out of later cycle collections: a full
    collection walking them paused a search for 50-60 ms on this machine."""
    gc.collect()
    gc.freeze()


def _federation_public_key(settings: Settings) -> int:
    from cryptography.hazmat.primitives import serialization

    from imaging_gateway.security.tokens import load_or_create_signing_key

    key = load_or_create_signing_key(
        settings.federation.signing_key_file, setting="federation.signing_key_file"
    )
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    print(pem.decode("ascii"), end="")
    return 0


def _tokens(settings: Settings, args: argparse.Namespace) -> int:
    from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key

    key = load_or_create_signing_key(settings.security.token_key_file)
    authority = TokenAuthority(
        key, province=settings.gateway.province, max_ttl_s=settings.security.token_max_ttl_s
    )
    print(
        authority.issue(
            subject=args.subject or args.role,
            role=args.role,
            hospital=args.hospital,
            national_id=args.national_id,
            ttl_s=_ttl_seconds(args.ttl),
        )
    )
    return 0


async def _async_command(settings: Settings, args: argparse.Namespace) -> int:
    from imaging_gateway.index.sql import SqlIndex
    from imaging_gateway.storage.factory import load_phi_codec

    phi = load_phi_codec(settings)
    sealing = args.command == "seal-index"
    if sealing and phi is None:
        raise ConfigError(
            "encryption.enabled", "must be true to seal the index (its keyring seals the cells)"
        )
    index = await SqlIndex.open(settings.index, phi=phi, check_phi=not sealing)
    try:
        if sealing:
            return await _seal_index(index, args)
        if args.command == "sync":
            return await _sync(settings, index, args)
        if args.command == "audit":
            return await _audit(settings, index, args)
        if args.index_command == "stats":
            stats = await index.stats()
            _print(stats, as_json=args.json)
        elif args.index_command == "jobs":
            jobs = [j.as_json() for j in await index.list_jobs(store=args.store)]
            if args.json:
                print(json.dumps(jobs, ensure_ascii=False, indent=2))
            else:
                for j in jobs:
                    print(
                        f"{j['id']}  {j['store']:<16} {j['mode']:<11} {j['status']:<11} "
                        f"{j['created_at']}  {j['counters']}"
                    )
        elif args.index_command == "quarantine":
            await _quarantine(index, store=args.store, as_json=args.json)
        # "migrate" needs nothing more: opening the index migrated it.
        return 0
    finally:
        await index.close()


async def _quarantine(index: Any, *, store: str | None, as_json: bool) -> None:
    """Print every quarantined object (store, key, reason, last seen), page by page."""
    after: tuple[str, str] | None = None
    first = True
    if as_json:
        print("[", end="")
    while True:
        page = await index.list_quarantine(store=store, after=after, limit=1000)
        for entry in page:
            if as_json:
                print(("\n  " if first else ",\n  ")
                      + json.dumps(entry.as_json(), ensure_ascii=False), end="")
            else:
                print(f"{entry.store}  {entry.key}  {entry.reason}  "
                      f"(last seen {entry.last_seen.isoformat()})")
            first = False
        if len(page) < 1000:
            break
        after = (page[-1].store, page[-1].key)
    if as_json:
        print("\n]" if not first else "]")


async def _seal_index(index: Any, args: argparse.Namespace) -> int:
    from imaging_gateway.index.seal import seal_index

    def progress(table: str, rows: int) -> None:
        log.info("seal-index: %s: %d rows rewritten", table, rows)

    done = await seal_index(index, batch=args.batch, progress=progress)
    _print({f"{table}_rewritten": n for table, n in done.items()}, as_json=False)
    return 0


def _print(data: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        width = max(len(k) for k in data)
        for k, v in data.items():
            print(f"{k:<{width}}  {v}")


async def _audit(settings: Settings, index: Any, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from imaging_gateway.security.audit import AuditLog, load_chain_key

    audit = AuditLog(index.engine, load_chain_key(settings.security.audit_key_file))
    if args.audit_command == "verify":
        anchor: tuple[int, str] | None = None
        if args.anchor is not None:
            seq, _, digest = args.anchor.partition(":")
            if not seq.isdigit() or len(digest) != 64:
                raise GatewayError(f"--anchor: expected SEQ:HASH, got {args.anchor!r}")
            anchor = (int(seq), digest.lower())
        report = await audit.verify(anchor=anchor)
        if args.json:
            print(json.dumps(report.as_json()))
        elif report.ok:
            print(f"intact: {report.checked} records; head {report.last_seq}:{report.last_hash}")
        else:
            print(
                f"BROKEN at seq {report.seq}: {report.reason} "
                f"(records up to seq {report.last_seq} are intact)"
            )
        return 0 if report.ok else 1

    def when(flag: str, text: str | None) -> datetime | None:
        if text is None:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise GatewayError(f"{flag}: expected an ISO 8601 time, got {text!r}") from None
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    since, until = when("--since", args.since), when("--until", args.until)
    province = settings.gateway.province
    try:
        out = args.out.open("w", encoding="utf-8")
    except OSError as exc:
        raise GatewayError(f"--out: cannot write {args.out}: {exc.strerror}") from None
    with out:
        n = await audit.export(
            out, since=since, until=until, source_id=f"imaging-gateway:{province}", site=province
        )
    print(f"{n} audit messages written to {args.out}", file=sys.stderr)
    return 0


async def _sync(settings: Settings, index: Any, args: argparse.Namespace) -> int:
    from imaging_gateway.storage.factory import load_store_keys, open_gateway_store
    from imaging_gateway.sync.progress import ProgressBar
    from imaging_gateway.sync.runner import SyncRunner

    store = open_gateway_store(settings, args.store, load_store_keys(settings))
    try:
        runner = SyncRunner(settings, index, store)
        job = await runner.start(mode="full" if args.full else "incremental", restart=args.restart)
        assert runner.progress is not None
        mode: Literal["bar", "log", "off"] = (
            "off" if args.no_progress else "bar" if sys.stderr.isatty() else "log"
        )
        async with ProgressBar(runner.progress, mode=mode):
            job = await runner.run()
    finally:
        await store.close()
    summary = {
        "job": job.id,
        "store": job.store,
        "mode": job.mode,
        "status": job.status,
        **job.counters,
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        _print(summary, as_json=False)
    return 0


def _keys_local(settings: Settings, args: argparse.Namespace) -> int:
    from imaging_gateway.crypto.aead import Suite
    from imaging_gateway.crypto.keyring import FileKeyring, load_keyring

    enc = settings.encryption
    setting = "encryption.keyring_file"
    if args.keys_command == "init":
        suite = Suite(args.suite or enc.suite)
        ring = FileKeyring.create(
            enc.keyring_file,
            setting=setting,
            key_id=f"gateway-{settings.gateway.province}",
            suite=suite,
        )
        print(
            f"keyring created at {ring.path}: key {ring.key_id!r}, {suite.value}, version 1 "
            "(mode 0600; back it up: without it no encrypted object can be read)"
        )
        if suite.value != enc.suite:
            print(f'note: set encryption.suite = "{suite.value}" to use this keyring')
        return 0
    ring = load_keyring(enc.keyring_file, setting=setting)
    version = ring.rotate()
    print(
        f"key {ring.key_id!r}: version {version} is now current; restart the gateways so they "
        f"wrap with it, then run `imaging-gateway keys rewrap --store NAME` for every store"
    )
    return 0


async def _keys_stores(settings: Settings, args: argparse.Namespace) -> int:
    """keys status | rewrap | retire and seal: the commands that look into stores."""
    from imaging_gateway.crypto.keyring import FileKeyring
    from imaging_gateway.errors import ConfigError, Conflict
    from imaging_gateway.storage.encrypted import EncryptedStore
    from imaging_gateway.storage.factory import load_store_keys, open_gateway_store
    from imaging_gateway.storage.maintenance import Tally, progress_lines, rewrap_store, seal_store

    ring = load_store_keys(settings)
    if ring is None:
        raise ConfigError(
            "encryption.keyring_file",
            f"{settings.encryption.keyring_file} is missing; run `imaging-gateway keys init`",
        )
    assert isinstance(ring, FileKeyring)

    def encrypted(name: str) -> EncryptedStore:
        store = open_gateway_store(settings, name, ring)
        assert isinstance(store, EncryptedStore)
        if args.command == "seal":
            # Sealing encrypts whatever encryption.enabled says: the admin asked for it.
            store.encrypt_writes = True
        return store

    if args.command == "seal" or args.keys_command == "rewrap":
        store = encrypted(args.store)
        try:
            if args.command == "seal":
                tally = Tally("seal", store.name)
                async with progress_lines(tally):
                    await seal_store(store, concurrency=max(1, args.concurrency), tally=tally)
            else:
                tally = Tally("rewrap", store.name)
                async with progress_lines(tally):
                    await rewrap_store(store, concurrency=max(1, args.concurrency), tally=tally)
        finally:
            await store.close()
        _print({"store": store.name, **tally.counters}, as_json=False)
        return 0

    records: dict[str, object] = {}
    if args.keys_command == "retire" or args.stores:
        for s in settings.stores:
            store = encrypted(s.name)
            try:
                records[s.name] = await store.read_status()
            finally:
                await store.close()
    if args.keys_command == "status":
        doc: dict[str, Any] = {
            "keyring_file": str(ring.path),
            "key_id": ring.key_id,
            "suite": ring.suite.value,
            "versions": list(ring.versions),
            "current": ring.current_version,
            "encrypt_writes": settings.encryption.enabled,
        }
        if args.stores:
            doc["rewrap"] = records
        if settings.encryption.enabled:
            from imaging_gateway.index.sql import SqlIndex

            # Read only: without the codec, opening loads (and re-wraps) no key.
            index = await SqlIndex.open(settings.index, check_phi=False)
            try:
                doc["index_key_versions"] = sorted(v for _, v in await index.phi_key_versions())
            finally:
                await index.close()
        if args.json:
            print(json.dumps(doc, ensure_ascii=False))
        else:
            _print(doc, as_json=False)
        return 0

    # retire: every store's last complete rewrap must have moved its keys past the version,
    # and the index's PHI data keys must be wrapped past it (opening the index does that).
    version: int = args.version
    if not args.force and settings.encryption.enabled:
        from imaging_gateway.crypto.phi import PhiCodec
        from imaging_gateway.index.sql import SqlIndex

        index = await SqlIndex.open(settings.index, phi=PhiCodec(ring), check_phi=False)
        try:
            wrapped = await index.phi_key_versions()
        finally:
            await index.close()
        if any(key_id == ring.key_id and v <= version for key_id, v in wrapped):
            raise Conflict(
                f"keys retire: the index's PHI data key is still wrapped under version "
                f"{version}; open the index with the current keyring (any command) first"
            )
    if not args.force:
        behind = [
            name
            for name, rec in records.items()
            if not (
                isinstance(rec, dict)
                and rec.get("complete") is True
                and rec.get("key_id") == ring.key_id
                and isinstance(rec.get("version"), int)
                and rec["version"] > version
            )
        ]
        if behind:
            raise Conflict(
                f"keys retire: version {version} may still be needed: no complete rewrap past "
                f"it for store(s) {', '.join(behind)}; run `imaging-gateway keys rewrap "
                "--store NAME`",
            )
    ring.retire(version)
    print(f"key {ring.key_id!r}: version {version} retired; versions now {list(ring.versions)}")
    return 0
