"""``mnemosyne registry``: serve the optimizer registry and talk to it.

Examples::

    mnemosyne registry serve --data ./registry-data --port 50051 --token-file token.txt
    mnemosyne registry push ckpt.msgpack --name mnemosyne-digits --token-file token.txt
    mnemosyne registry alias mnemosyne-digits best 3 --token-file token.txt
    mnemosyne registry pull mnemosyne-digits@best -o best.msgpack
    mnemosyne registry list mnemosyne-digits
    mnemosyne registry watch mnemosyne-digits@best

Client commands talk to ``--registry`` (default ``$MNEMOSYNE_REGISTRY`` or
``grpc://127.0.0.1:50051``); the token comes from ``--token-file`` or
``$MNEMOSYNE_REGISTRY_TOKEN``. Exit codes: 0 ok, 1 the registry refused or
failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

from service.cli import CLIError

DEFAULT_REGISTRY = "grpc://127.0.0.1:50051"


def register(subparsers) -> None:
    parser = subparsers.add_parser("registry", help="serve the optimizer registry or use it (push/pull/list/alias/watch)")
    sub = parser.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    serve = sub.add_parser("serve", help="run a registry server until SIGTERM")
    serve.add_argument("--data", required=True, help="directory for artifacts (and the default SQLite database)")
    serve.add_argument("--db", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in --data)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed at start)")
    serve.add_argument("--token-file", help="bearer tokens, one per line; required for writes when given")
    serve.add_argument("--read-token-required", action="store_true", help="require the token for reads too")
    serve.add_argument("--tls-cert", help="PEM certificate (with --tls-key) to serve TLS")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on SIGTERM")
    serve.add_argument("--skip-verify", action="store_true", help="don't re-hash every blob at startup")
    serve.set_defaults(func=_serve)

    fsck = sub.add_parser("fsck", help="re-verify every blob; report orphans, temp files and damage")
    fsck.add_argument("--data", required=True, help="the registry's data directory")
    fsck.add_argument("--db", help="SQLAlchemy URL (default: SQLite in --data)")
    fsck.add_argument("--repair", action="store_true",
                      help="delete temp files and orphans, quarantine corrupt blobs (refuses while a server runs)")
    fsck.set_defaults(func=_fsck)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--registry", default=os.environ.get("MNEMOSYNE_REGISTRY", DEFAULT_REGISTRY),
                       help="grpc://HOST:PORT or grpcs://HOST:PORT (default $MNEMOSYNE_REGISTRY or %(default)s)")
        p.add_argument("--token-file", help="file holding the bearer token (default $MNEMOSYNE_REGISTRY_TOKEN)")
        p.add_argument("--tls-ca", help="PEM CA certificate to trust (implies TLS)")
        p.add_argument("--timeout", type=float, default=30.0, help="deadline per call in seconds")
        return p

    push = client_parser("push", "publish a checkpoint file as the next version")
    push.add_argument("file")
    push.add_argument("--name", required=True)
    push.add_argument("--metadata", help="VersionMetadata as JSON (lineage, compatibility, tags, description)")
    push.add_argument("--alias", action="append", default=[], help="also point this alias at the new version")
    push.add_argument("--opaque", action="store_true",
                      help="publish bytes that are not a Mnemosyne checkpoint (stored unchecked, never decoded)")
    push.set_defaults(func=_push)

    pull = client_parser("pull", "download a version (sha256-verified)")
    pull.add_argument("ref", metavar="NAME[@ALIAS|:VERSION]")
    pull.add_argument("-o", "--output", required=True)
    pull.set_defaults(func=_pull)

    ls = client_parser("list", "list optimizers, or the versions of one")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_list)

    alias = client_parser("alias", "point an alias at a version (or --delete it)")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", nargs="?", type=int)
    alias.add_argument("--delete", action="store_true")
    alias.set_defaults(func=_alias)

    watch = client_parser("watch", "print every move of an alias until interrupted")
    watch.add_argument("ref", metavar="NAME@ALIAS")
    watch.add_argument("--count", type=int, default=0, help="exit after this many events")
    watch.add_argument("--after", type=int, default=0, metavar="SEQ",
                       help="resume after this event sequence (the seq= column): print every move since")
    watch.add_argument("--follow", action="store_true",
                       help="when the server goes away, reconnect and resume after the last event printed")
    watch.set_defaults(func=_watch)


# -- server -------------------------------------------------------------------
def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {what} {path}: {exc.strerror}") from None


def _serve(args) -> int:
    from service.registry.auth import load_tokens_text
    from service.registry.errors import DataDirLocked
    from service.registry.server import serve

    if bool(args.tls_cert) != bool(args.tls_key):
        raise CLIError("--tls-cert and --tls-key must be given together")
    tokens: tuple[str, ...] = ()
    if args.token_file:
        tokens = load_tokens_text(_read(args.token_file, "token file").decode())
        if not tokens:
            raise CLIError(f"token file {args.token_file} contains no token")
    if args.read_token_required and not tokens:
        raise CLIError("--read-token-required needs --token-file")
    # Operators see the startup recovery report and unexpected errors on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(
            args.data, db_url=args.db, host=args.host, port=args.port, tokens=tokens,
            read_token_required=args.read_token_required, tls_cert=_read(args.tls_cert, "certificate"),
            tls_key=_read(args.tls_key, "key"), grace=args.grace, verify_on_start=not args.skip_verify,
        )
    except DataDirLocked as exc:
        raise CLIError(str(exc), 1) from None
    except RuntimeError as exc:  # bind failure
        raise CLIError(f"{exc}: is another server using the port?", 1) from None
    except Exception as exc:
        if type(exc).__module__.startswith("sqlalchemy"):
            raise CLIError(f"cannot open database {args.db or '(sqlite)'}: {str(exc).splitlines()[0]}", 1) from None
        raise


def _fsck(args) -> int:
    from service.registry.errors import DataDirLocked
    from service.registry.fsck import fsck

    try:
        report = fsck(args.data, args.db, repair=args.repair)
    except (DataDirLocked, FileNotFoundError) as exc:
        raise CLIError(str(exc), 1) from None
    action = {"temp": "removed", "orphans": "removed", "corrupt": "quarantined"}
    for kind in ("temp", "orphans", "corrupt", "missing"):
        for item in getattr(report, kind):
            done = f" ({action[kind]})" if report.repaired and kind in action else ""
            print(f"{kind.removesuffix('s')}: {item}{done}")
    print(f"fsck: {report.verified} blobs verified, {len(report.temp)} temp files, {len(report.orphans)} orphans, "
          f"{len(report.corrupt)} corrupt, {len(report.missing)} missing"
          + (" (repaired)" if report.repaired else ""))
    if report.missing:
        raise CLIError(f"{len(report.missing)} versions' blobs are lost; their versions fail with DATA_LOSS", 1)
    if not report.clean:
        raise CLIError("problems found; run again with --repair to fix them", 1)
    return 0


# -- client -------------------------------------------------------------------
def _client(args):
    from mnemosyne_registry import InvalidURIError, RegistryClient

    token = None
    if args.token_file:
        # Same format as the server's token file: the first token line is used.
        lines = [line.strip() for line in _read(args.token_file, "token file").decode().splitlines()]
        tokens = [line for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise CLIError(f"token file {args.token_file} contains no token")
        token = tokens[0]
    try:
        return RegistryClient(args.registry, token=token, tls_ca=_read(args.tls_ca, "CA certificate"),
                              timeout=args.timeout)
    except InvalidURIError as exc:
        raise CLIError(str(exc)) from None


def _run(args, action):
    """Run ``action(client)``, turning client errors into one-line CLI errors."""
    from mnemosyne_registry import InvalidURIError, RegistryClientError

    client = _client(args)
    try:
        return action(client)
    except InvalidURIError as exc:
        raise CLIError(str(exc)) from None
    except RegistryClientError as exc:
        message = " ".join(exc.message.split())  # gRPC details may span lines
        if exc.code == "UNAVAILABLE":
            message = f"cannot reach registry at {args.registry}: {message}"
        raise CLIError(f"{exc.code}: {message}", 1) from None
    finally:
        client.close()


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _push(args) -> int:
    data = _read(args.file, "file")
    if not data:
        raise CLIError(f"{args.file} is empty")
    metadata = None
    if args.metadata:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--metadata is not valid JSON: {exc}") from None
        if not isinstance(metadata, dict):
            raise CLIError("--metadata must be a JSON object")
    if args.opaque:
        metadata = metadata or {}
        metadata.setdefault("compatibility", {})["format"] = "opaque"
    elif ((metadata or {}).get("compatibility") or {}).get("format", "") != "opaque":
        _check_checkpoint(args.file, data)

    def action(client):
        try:
            version = client.publish(data, args.name, metadata)
        except (ValueError, TypeError) as exc:  # metadata that doesn't fit VersionMetadata
            raise CLIError(f"invalid --metadata: {' '.join(str(exc).split())}") from None
        for alias in args.alias:
            client.set_alias(args.name, alias, version.number)
        aliases = ", ".join(["latest", *args.alias])
        print(f"pushed {version.name}:{version.number} ({version.size} bytes, sha256 {version.sha256}) [{aliases}]")
        return 0

    return _run(args, action)


def _check_checkpoint(path: str, data: bytes) -> None:
    """Decode the whole checkpoint here (θ against its config), before anything is sent."""
    from mnemosyne_core import checkpoint

    try:
        checkpoint.from_bytes(data)
    except checkpoint.CheckpointError as exc:
        raise CLIError(f"{path} is not a Mnemosyne checkpoint the registry accepts: {exc} "
                       "(--opaque publishes other bytes)") from None


def _pull(args) -> int:
    from mnemosyne_registry import parse_ref

    def action(client):
        name, number, alias = parse_ref(args.ref)
        version = client.download(name, number or alias, args.output)
        print(f"pulled {version.name}:{version.number} -> {args.output} ({version.size} bytes, sha256 verified)")
        return 0

    return _run(args, action)


def _list(args) -> int:
    from google.protobuf import json_format

    def action(client):
        items = client.list(args.name)
        for item in items:
            if args.json:
                print(json.dumps(json_format.MessageToDict(item, preserving_proto_field_name=True), sort_keys=True))
            elif args.name:
                aliases = ",".join(item.aliases)
                print(f"{item.name}:{item.number}\t{item.size}\t{item.sha256[:12]}\t{_when(item.created_unix_ms)}\t{aliases}")
            else:
                # `latest` has its own column: the alias map holds it too, so leave it out here.
                aliases = ",".join(f"{a}={v}" for a, v in sorted(item.aliases.items()) if a != "latest")
                print(f"{item.name}\tlatest={item.latest_version}\t{aliases}")
        return 0

    return _run(args, action)


def _alias(args) -> int:
    if args.delete == (args.version is not None):
        raise CLIError("give either VERSION or --delete")

    def action(client):
        if args.delete:
            client.delete_alias(args.name, args.alias)
            print(f"deleted {args.name}@{args.alias}")
        else:
            a = client.set_alias(args.name, args.alias, args.version)
            print(f"{a.name}@{a.alias} -> {a.version}")
        return 0

    return _run(args, action)


def _watch(args) -> int:
    from mnemosyne_registry import RegistryClientError, parse_ref

    if args.after < 0:
        raise CLIError("--after must be >= 0")

    def action(client):
        name, number, alias = parse_ref(args.ref)
        if number is not None or "@" not in args.ref:
            raise CLIError(f"watch needs NAME@ALIAS, got {args.ref!r}")
        seen, last, backoff = 0, args.after, 0.5
        while True:
            watch = client.watch(name, alias, after_sequence=last)
            try:
                for event in watch:
                    target = "deleted" if event.deleted else str(event.version)
                    print(f"{_when(event.unix_ms)}\t{event.name}@{event.alias} -> {target}\tseq={event.sequence}",
                          flush=True)
                    seen, last, backoff = seen + 1, event.sequence, 0.5
                    if args.count and seen >= args.count:
                        return 0
                return 0  # the server ended the stream without an error
            except RegistryClientError as exc:
                if not args.follow or exc.code not in ("UNAVAILABLE", "OUT_OF_RANGE"):
                    raise
                if exc.code == "OUT_OF_RANGE":  # moves were trimmed: start over from the current target
                    print(f"watch: events after seq={last} are no longer kept; re-reading {name}@{alias}",
                          file=sys.stderr, flush=True)
                    last = 0
                    continue
                print(f"watch: {exc.code}: {' '.join(exc.message.split())[:200]}; reconnecting in {backoff:g} s "
                      f"after seq={last}", file=sys.stderr, flush=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                watch.cancel()

    return _run(args, action)
