"""``gsp serve``: run the retrieval web service (API, metrics and the search page)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.commands.options import add_device_option, add_gallery_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a gallery over HTTP (search API, web page, metrics)",
        description="Serve a gallery over HTTP. Every option can also be set as a GSP_* "
        "environment variable (or in .env); options given here win.",
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (GSP_CHECKPOINT)")
    add_gallery_option(parser, required=False, help_text="gallery directory (GSP_GALLERY)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_device_option(parser, default=None, default_text="GSP_DEVICE, else auto")
    parser.add_argument(
        "--image-root",
        type=Path,
        action="append",
        dest="image_roots",
        help="directory gallery images may be served from (repeatable)",
    )
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="open the gallery read-only and follow its writer or its publications "
        "(GSP_GALLERY_READ_ONLY)",
    )
    parser.add_argument("--no-batching", action="store_true", help="run every query alone")
    parser.add_argument("--batch-max-size", type=int, help="GSP_BATCH_MAX_SIZE")
    parser.add_argument("--batch-max-wait-ms", type=float, help="GSP_BATCH_MAX_WAIT_MS")
    parser.add_argument(
        "--processes",
        type=int,
        help="server processes on the port (GSP_PROCESSES, default 1): the first writes the "
        "gallery, the others follow it and forward writes to it",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="with several processes: where their sockets and shared metrics live "
        "(default: a temporary directory)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    overrides = {
        "checkpoint": args.checkpoint,
        "gallery": args.gallery,
        "device": args.device,
        "image_roots": args.image_roots,
        "batch_max_size": args.batch_max_size,
        "batch_max_wait_ms": args.batch_max_wait_ms,
        "batching": False if args.no_batching else None,
        "processes": args.processes,
        "gallery_read_only": True if args.read_only else None,
    }
    return serve(
        overrides, host=args.host, port=args.port, log_level=args.log_level, run_dir=args.run_dir
    )


def serve(
    overrides: Mapping[str, object],
    *,
    host: str,
    port: int,
    log_level: str = "info",
    run_dir: Path | None = None,
) -> int:
    """Serve until stopped, with the ``GSP_*`` settings (environment, ``.env``) and the given
    ``overrides`` of them (None values left out); 2 for invalid settings, 1 when the service
    cannot start (say a checkpoint that is not there)."""
    import uvicorn
    from pydantic import ValidationError

    from app.service.inference import StartupError
    from app.service.main import create_app
    from app.service.processes import serve_processes
    from app.service.server import server_options
    from app.service.settings import Settings

    # Values of any type: pydantic validates and converts each one (ValidationError below).
    given: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**given)
        if settings.processes > 1:
            return serve_processes(
                settings, host=host, port=port, log_level=log_level, run_dir=run_dir
            )
        app = create_app(settings)
    except ValidationError as error:
        print(f"gsp serve: invalid settings:\n{error}", file=sys.stderr)
        return 2
    except StartupError as error:
        print(f"gsp serve: cannot start: {error}", file=sys.stderr)
        return 1
    shown = f"[{host}]" if ":" in host else host
    print(
        f"Serving on http://{shown}:{port}/ (API docs: http://{shown}:{port}/docs)",
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        **server_options(settings),
    )
    return 0
