"""``gsp serve --processes N``: several server processes on one port over one gallery.

One Python process decodes every upload, parses every form and builds every response; with
more processes that work spreads over the cores. The parent binds the port once and starts N
processes (spawned: fresh interpreters, no forked CUDA or thread state) that all accept
connections from that socket, so connections go to whichever process is free, and those of a
process that dies go to the others.

- Process 0, the *leader*, opens the gallery for writing, as a single-process server does.
- The others, *followers*, open it read-only and follow it (``GSP_GALLERY_FOLLOW_INTERVAL_S``,
  see :mod:`app.service.store`): a write the leader answered is searchable in every follower
  within that interval (0.25 s by default) plus one refresh; a gallery replaced on disk is
  re-opened and swapped in atomically.
- Followers forward gallery writes to the leader (:mod:`app.service.forwarding`) and take
  them in before answering, so any process accepts writes and a client reads its own write
  back. While the leader restarts, writes get 503 ``leader_unavailable``; searches go on.
- Each process also listens on ``RUN_DIR/process-<i>.sock``: the leader's is where writes are
  forwarded; every one lets an operator (or a test) speak to one chosen process.
- Each process has its own model and micro-batcher (GPU work is batched per process) and its
  own in-flight limit: N processes admit up to N x ``GSP_MAX_IN_FLIGHT`` requests.
- ``/metrics`` of any process covers all of them (prometheus-client's multiprocess mode, in
  ``RUN_DIR/metrics``; see :mod:`app.service.metrics`).
- A process that exits is started again; one that exits :data:`QUICK_FAILURES` times in a row
  within :data:`QUICK_SECONDS` of starting (a gallery that will not open, say) stops the
  server with status 1. SIGHUP is passed to every process (each re-opens the gallery);
  SIGTERM and SIGINT stop them all gracefully.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from app.service.settings import Settings

__all__ = ["QUICK_FAILURES", "QUICK_SECONDS", "process_socket", "serve_processes"]

QUICK_SECONDS = 30.0
QUICK_FAILURES = 3
_STOP_SECONDS = 20.0


def process_socket(run_dir: Path, index: int) -> Path:
    """The private Unix socket of process ``index`` (0: the leader)."""
    return run_dir / f"process-{index}.sock"


@dataclass
class _Slot:
    index: int
    process: BaseProcess
    started: float
    quick_failures: int


def serve_processes(
    settings: Settings,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    run_dir: Path | None = None,
) -> int:
    """Serve with ``settings.processes`` processes until SIGTERM or SIGINT; 1 when a process
    keeps failing to start. ``run_dir`` (default: a temporary directory, removed at the end)
    holds the processes' sockets and shared metrics."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        print(f"gsp serve: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        return 1
    own_run_dir = run_dir is None
    run = Path(tempfile.mkdtemp(prefix="gsp-serve-")) if run_dir is None else run_dir
    metrics_dir = run / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    # Read by prometheus-client when it is first imported: in the spawned processes.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    context = multiprocessing.get_context("spawn")
    pending: list[int] = []

    def start(index: int, quick_failures: int = 0) -> _Slot:
        process = context.Process(
            target=_serve_one,
            args=(settings, index, run, listener, log_level),
            name=f"gsp-serve-{index}",
        )
        process.start()
        role = "leader: writes the gallery" if index == 0 else "follower"
        print(f"process {index} ({role}), pid {process.pid}", flush=True)
        return _Slot(index, process, time.monotonic(), quick_failures)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {
        number: signal.signal(number, on_signal)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    shown = f"[{host}]" if ":" in host else host
    print(
        f"Serving on http://{shown}:{port}/ (API docs: http://{shown}:{port}/docs) with "
        f"{settings.processes} processes; run directory {run}",
        flush=True,
    )
    slots = [start(index) for index in range(settings.processes)]
    try:
        while True:
            if any(number != signal.SIGHUP for number in pending):
                return 0
            while pending:
                pending.pop()
                for slot in slots:
                    if slot.process.pid is not None and slot.process.is_alive():
                        os.kill(slot.process.pid, signal.SIGHUP)
            ended = wait([slot.process.sentinel for slot in slots], timeout=0.5)
            if any(number != signal.SIGHUP for number in pending):
                return 0
            for slot in [s for s in slots if s.process.sentinel in ended]:
                code = _reap(slot.process, metrics_dir)
                quick = time.monotonic() - slot.started < QUICK_SECONDS
                failures = slot.quick_failures + 1 if quick else 0
                if failures >= QUICK_FAILURES:
                    print(
                        f"gsp serve: process {slot.index} exited {failures} times within "
                        f"{QUICK_SECONDS:.0f} s of starting (last status {code}); stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                print(
                    f"gsp serve: process {slot.index} exited with status {code}; starting it again",
                    file=sys.stderr,
                    flush=True,
                )
                slots[slot.index] = start(slot.index, failures)
    finally:
        _stop_all(slots)
        listener.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
        if own_run_dir:
            shutil.rmtree(run, ignore_errors=True)


def _reap(process: BaseProcess, metrics_dir: Path) -> int | None:
    """Collect an exited process; its live gauges (requests in flight) stop counting."""
    from prometheus_client import multiprocess

    process.join()
    if process.pid is not None:
        multiprocess.mark_process_dead(process.pid, str(metrics_dir))
    return process.exitcode


def _stop_all(slots: list[_Slot]) -> None:
    for slot in slots:
        if slot.process.is_alive():
            slot.process.terminate()  # SIGTERM: uvicorn finishes the requests in progress
    deadline = time.monotonic() + _STOP_SECONDS
    for slot in slots:
        slot.process.join(max(0.0, deadline - time.monotonic()))
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()


def _serve_one(
    settings: Settings, index: int, run_dir: Path, listener: socket.socket, log_level: str
) -> None:
    """One server process: the app on the shared listener and on its private socket."""
    # Until the service installs its reload handler, a SIGHUP must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import uvicorn

    from app.service.inference import StartupError
    from app.service.main import create_app
    from app.service.server import server_options

    leader = None if index == 0 else process_socket(run_dir, 0)
    if leader is not None:
        settings = settings.model_copy(update={"gallery_read_only": True})
    try:
        app = create_app(settings, leader=leader)
    except StartupError as error:
        print(f"gsp serve: process {index} cannot start: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    private_path = process_socket(run_dir, index)
    private_path.unlink(missing_ok=True)
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private.bind(str(private_path))
    options = server_options(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, **options))
    server.run(sockets=[listener, private])
