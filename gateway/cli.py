"""The ``imagegate`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from gateway.settings import Settings, add_settings_arguments

logger = logging.getLogger("imagegate")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="imagegate",
        description="Self-hosted SDXL image generation behind the APIs your clients already speak.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="load a model and serve every API dialect",
        description="Load MODEL (default: the built-in tiny-sdxl, which makes noise images) and "
        "serve it. Every flag can also be set as an IMAGEGATE_* environment variable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("model_arg", nargs="?", metavar="MODEL",
                       help="diffusers folder, .safetensors checkpoint, cached hub id, or tiny-sdxl")
    add_settings_arguments(serve)
    return parser


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
    logger.info("model %s found in %.1fs; starting on http://%s:%d", settings.model,
                time.perf_counter() - started, settings.host, settings.port)
    from gateway.app import create_app
    from gateway.server import run

    run(settings, create_app(settings, keys=keys))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imagegate`` script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
