"""The ``imagegate`` command line."""

from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.settings import Settings, add_settings_arguments

logger = logging.getLogger("imagegate")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="imagegate",
        description="Self-hosted SDXL image generation behind the APIs your clients already speak.",
    )
    parser.add_argument("--version", action="version", version=f"imagegate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="load a model and serve every API dialect",
        description="Load MODEL (default: the built-in tiny-sdxl, which makes noise images) and "
        "serve it. Every flag can also be set as an IMAGEGATE_* environment variable.",
    )
    serve.add_argument("model_arg", nargs="?", metavar="MODEL",
                       help="diffusers folder, .safetensors checkpoint, cached hub id, or tiny-sdxl")
    add_settings_arguments(serve)

    keys = sub.add_parser("keys", help="create, list, revoke and delete clients (API keys + "
                          "OAuth secrets)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create", help="add a client; prints its API key and OAuth secret once",
        description="Add a client to the keys file. Its API key (OpenAI-style bearer key) and "
        "OAuth client secret (Baidu's Secret Key; the client id is its API Key) are printed "
        "once; only their SHA-256 hashes are stored.",
    )
    create.add_argument("--id", required=True, help="client id (also the OAuth client_id)")
    create.add_argument("--scopes", default="*",
                        help="comma-separated API (dialect) names the client may use, e.g. "
                        "openai,baidu; * for all; unknown names are refused")
    create.add_argument("--rps", type=float, default=None, help="requests per second limit")
    create.add_argument("--daily", type=int, default=None, help="requests per UTC day limit")
    create.add_argument("--admin", action="store_true", help="may read GET /admin/usage")
    listing = keys_sub.add_parser("list", help="list clients (never secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a client: its key, secret and tokens")
    revoke.add_argument("id", help="client id")
    delete = keys_sub.add_parser("delete", help="remove a client from the keys file entirely "
                                 "(its usage rows stay in the ledger)")
    delete.add_argument("id", help="client id")
    for p in (create, listing, revoke, delete):
        p.add_argument("--keys-file", default=None,
                       help="keys file [env IMAGEGATE_KEYS_FILE]")

    usage = sub.add_parser("usage", help="print the usage ledger (per client per UTC day)")
    usage.add_argument("--client", default=None, help="only this client id")
    usage.add_argument("--since", default=None, help="from this date on (YYYY-MM-DD)")
    usage.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    usage.add_argument("--usage-db", default=None,
                       help="ledger file [env IMAGEGATE_USAGE_DB; default DATA_DIR/usage.sqlite3]")
    usage.add_argument("--data-dir", default=None, help="[env IMAGEGATE_DATA_DIR]")
    usage.add_argument("--redis-url", default=None,
                       help="read the replicas' shared ledger in Redis [env IMAGEGATE_REDIS_URL]")
    usage.add_argument("--redis-prefix", default=None, help="[env IMAGEGATE_REDIS_PREFIX]")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagegate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _scope_names() -> list[str]:
    """The dialect names a client may be scoped to."""
    from gateway.dialects import discover

    return sorted(d.name for d in discover())


def _keys_path(args: argparse.Namespace) -> Path | None:
    settings = Settings.from_sources({"keys_file": args.keys_file})
    return settings.keys_path


def keys_command(args: argparse.Namespace) -> int:
    """``imagegate keys create|list|revoke|delete``."""
    from auth.keys import load_keys_file, new_client, save_keys_file

    path = _keys_path(args)
    if path is None:
        print("imagegate: no keys file; pass --keys-file or set IMAGEGATE_KEYS_FILE",
              file=sys.stderr)
        return 2
    keys = load_keys_file(path)
    if args.keys_command == "create":
        if any(c.id == args.id for c in keys.clients):
            print(f"imagegate: client {args.id!r} already exists", file=sys.stderr)
            return 1
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()] or ["*"]
        known = _scope_names()
        unknown = [s for s in scopes if s != "*" and s not in known]
        if unknown:
            print(f"imagegate: unknown scope(s) {', '.join(map(repr, unknown))}; use * or any of: "
                  f"{', '.join(known)}", file=sys.stderr)
            return 2
        record, api_key, secret = new_client(args.id, scopes=scopes, rps=args.rps,
                                             daily=args.daily, admin=args.admin)
        keys.clients.append(record)
        save_keys_file(path, keys)
        print(f"client_id:     {record.id}")
        print(f"api_key:       {api_key}")
        print(f"client_secret: {secret}")
        print("These are shown once; only their hashes are stored in " + str(path),
              file=sys.stderr)
        return 0
    if args.keys_command == "list":
        print(f"{'id':<24} {'scopes':<20} {'rps':>6} {'daily':>8} admin  status")
        for c in keys.clients:
            print(f"{c.id:<24} {','.join(c.scopes):<20} {_num(c.rps):>6} {_num(c.daily):>8} "
                  f"{'yes' if c.admin else 'no':<6} {'revoked' if c.revoked else 'active'}")
        return 0
    for c in keys.clients:
        if c.id == args.id:
            if args.keys_command == "delete":
                keys.clients.remove(c)
                save_keys_file(path, keys)
                print(f"deleted {args.id}")
                return 0
            c.revoked = True
            save_keys_file(path, keys)
            print(f"revoked {args.id}")
            return 0
    print(f"imagegate: no client {args.id!r} in {path}", file=sys.stderr)
    return 1


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def usage_command(args: argparse.Namespace) -> int:
    """``imagegate usage [--client ID] [--since DATE]``."""
    import msgspec

    from gateway.replicas import usage_ledger

    settings = Settings.from_sources({"usage_db": args.usage_db, "data_dir": args.data_dir,
                                      "redis_url": args.redis_url,
                                      "redis_prefix": args.redis_prefix})
    if not settings.redis_url and not settings.usage_path.exists():
        print(f"imagegate: no usage ledger at {settings.usage_path}", file=sys.stderr)
        return 1
    ledger = usage_ledger(settings)
    try:
        rows = ledger.rows(args.client, args.since)
    except ValueError:
        print(f"imagegate: --since must be YYYY-MM-DD, got {args.since!r}", file=sys.stderr)
        return 2
    except OSError as exc:  # redis' ConnectionError is an OSError too
        print(f"imagegate: cannot read the usage ledger: {exc}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    if args.json:
        for row in rows:
            print(msgspec.json.encode(row).decode())
        return 0
    print(f"{'day':<10} {'client':<24} {'requests':>8} {'images':>7} {'tokens':>8} {'exec_s':>9}")
    for r in rows:
        print(f"{r.day:<10} {r.client:<24} {r.requests:>8} {r.images:>7} {r.prompt_tokens:>8} "
              f"{r.executor_seconds:>9.2f}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """``imagegate serve``."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "model_arg")}
    if args.model_arg:
        overrides["model"] = args.model_arg
    settings = Settings.from_sources(overrides)

    from observability.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from auth.keys import KeyStore

    keys = KeyStore.from_config(settings.api_keys, settings.keys_path)
    if not settings.is_loopback() and not keys.enabled and not settings.insecure_no_auth:
        print(
            f"imagegate: refusing to serve on {settings.host} with no API keys configured. "
            "Set IMAGEGATE_API_KEYS or --keys-file, or pass --insecure-no-auth to serve openly.",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    from inference.loader import ModelNotFound, hub_offline_by_default, resolve

    hub_offline_by_default(settings.allow_download)
    try:
        for name in filter(None, (settings.model, settings.refiner)):
            resolve(name, cache_dir=settings.cache_path, allow_download=settings.allow_download)
    except ModelNotFound as exc:
        print(f"imagegate: {exc}", file=sys.stderr)
        return 2
    # Finding the model reads no store. Then the port, then the data dir lock, and only then the
    # app (stores) and the model load: a busy port or a data dir in use by another server fails
    # in about a second, before any store is opened.
    sock = _listen(settings)
    if sock is None:
        return 2
    if not _lock_data_dir(settings) or not _reach_redis(settings) or not _open_tasks(settings):
        sock.close()
        return 2
    logger.info("model %s found in %.1fs; starting on http://%s:%d", settings.model,
                time.perf_counter() - started, settings.host, settings.port)
    from observability.logging import route_library_logs

    route_library_logs()
    from gateway.app import create_app
    from gateway.server import run

    run(settings, create_app(settings, keys=keys), sock)
    return 0


def _listen(settings: Settings) -> socket.socket | None:
    """The bound listening socket for ``serve``, or ``None`` after printing why not."""
    from gateway.server import bind

    try:
        return bind(settings.host, settings.port)
    except OSError as exc:
        print(f"imagegate: cannot listen on {settings.host}:{settings.port}: "
              f"{exc.strerror or exc}. Is another server running there? Pick another --port.",
              file=sys.stderr)
        return None


def _reach_redis(settings: Settings) -> bool:
    """With ``--redis-url``: True once Redis answers, else False after printing one line.

    Waits up to ``--redis-wait-s``: Redis may be starting beside this server.
    """
    if not settings.redis_url:
        return True
    import redis

    shown = re.sub(r"//[^@/]*@", "//***@", settings.redis_url)  # no password in logs
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    deadline = time.monotonic() + settings.redis_wait_s
    try:
        while True:
            try:
                client.ping()
                return True
            except redis.RedisError as exc:
                if time.monotonic() >= deadline:
                    print(f"imagegate: cannot reach Redis at {shown}: {str(exc).rstrip('.')}. "
                          "Start it, or fix --redis-url.", file=sys.stderr)
                    return False
                logger.warning("waiting for Redis at %s: %s", shown, exc)
                time.sleep(1.0)
    finally:
        client.close()


def _open_tasks(settings: Settings) -> bool:
    """Without Redis: True if the SQLite job store opens, else False after printing one line.

    Checked here so that a damaged file is one line and exit status 2, like the other set-up
    refusals, rather than a failed app start (a traceback, and the model-load exit status 3).
    """
    if settings.redis_url:
        return True
    import sqlite3

    from gateway.jobs import job_store

    store = job_store(settings.data_path, settings.results_dir or "")
    try:
        store.open()
    except (sqlite3.Error, OSError) as exc:
        print(f"imagegate: cannot open the job store {store.path}: {exc}. Move it aside to "
              "start with no jobs (its jobs are lost), or restore it.", file=sys.stderr)
        return False
    finally:
        store.close()
    return True


def _lock_data_dir(settings: Settings) -> bool:
    """Hold the data dir for this process's life; False after printing who else holds it."""
    from gateway import datadir

    try:
        datadir.acquire(settings.data_path, settings.port)
    except datadir.DataDirBusy as exc:
        print(f"imagegate: {exc}", file=sys.stderr)
        return False
    except OSError as exc:
        print(f"imagegate: cannot use the data dir {settings.data_path}: {exc}", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imagegate`` script.

    A bad setting or keys file ends the command with exit status 2 and one line per problem,
    never a traceback.
    """
    from auth.keys import KeysFileError
    from gateway.settings import SettingsError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "keys":
            return keys_command(args)
        if args.command == "usage":
            return usage_command(args)
    except SettingsError as exc:
        for line in exc.problems:
            print(f"imagegate: {line}", file=sys.stderr)
        return 2
    except KeysFileError as exc:
        print(f"imagegate: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
