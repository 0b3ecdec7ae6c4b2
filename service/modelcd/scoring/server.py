"""Command line and process model of the scoring server.

``python -m modelcd.scoring --model-dir DIR --config FILE --host 127.0.0.1 --port PORT [--workers N]``

The process started is gunicorn's arbiter (it never daemonizes): it binds the port, forks
``--workers`` worker processes and supervises them. Each worker loads the model once (custom
entry scripts get their ``init()`` there) and serves the ASGI app with uvicorn's event loop
and the httptools parser; the measurement behind that choice is in docs/benchmarks-scoring.md.
SIGTERM to the arbiter stops the workers gracefully and it exits 0; workers also get SIGTERM
if the arbiter dies (Linux). A model that fails to load makes every worker exit with gunicorn's
"app failed to load" code, and the arbiter then exits non-zero (4) at once.

The optional bearer key comes only from the environment (``MODELCD_SCORING_KEY``); it is
removed from the environment before the model is loaded and never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.errors import AppImportError, HaltServer
from uvicorn_worker import UvicornWorker

from .app import KEY_ENV, AsgiApp, build_app
from .config import ConfigError, ScoringConfig, load_config
from .flavors import LoadError

READY_FILE = "ready"
# State dirs (metrics files, ready marker, worker heartbeats) are named after the arbiter's pid,
# so a server started later can remove those of arbiters that were killed (SIGKILL runs no cleanup).
STATE_PREFIX = "modelcd-scoring-"
# Native math libraries start one thread per core in every worker; with one worker per core
# that oversubscribes the CPU. Only defaults: the environment wins.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class ScoringWorker(UvicornWorker):
    """uvicorn in a gunicorn worker: asyncio loop, httptools parser, no access log, no lifespan."""

    CONFIG_KWARGS = {
        "loop": "asyncio",
        "http": "httptools",
        "lifespan": "off",
        "access_log": False,
        "server_header": False,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m modelcd.scoring",
        description="Serve one model version over HTTP (POST /score, GET /healthz, /swagger.json, /metrics).",
        epilog=f"Set {KEY_ENV} in the environment to require 'Authorization: Bearer <key>' on /score.",
    )
    parser.add_argument("--model-dir", required=True, help="folder holding the model's files")
    parser.add_argument("--config", required=True, help="JSON scoring config (model, version, flavor, ...)")
    # Defaults from the environment let an image's CMD stay fixed while the target picks
    # the address (MODELCD_SCORING_HOST/PORT/WORKERS); flags win over the environment.
    env_port = os.environ.get("MODELCD_SCORING_PORT")
    parser.add_argument("--host", default=os.environ.get("MODELCD_SCORING_HOST", "127.0.0.1"),
                        help="address to bind (default $MODELCD_SCORING_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, required=env_port is None,
                        default=env_port,
                        help="TCP port to bind (default $MODELCD_SCORING_PORT)")
    parser.add_argument("--workers", type=_positive, default=os.environ.get("MODELCD_SCORING_WORKERS", "2"),
                        help="worker processes (default $MODELCD_SCORING_WORKERS or 2)")
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=120,
        help="seconds a worker may stay busy on one request before it is restarted",
    )
    parser.add_argument(
        "--keepalive", type=_positive, default=75, help="seconds an idle keep-alive connection stays open (default 75)"
    )
    parser.add_argument("--graceful-timeout", type=_positive, default=10, help="seconds to finish requests on SIGTERM")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class ScoringServer(BaseApplication):  # type: ignore[misc]
    """gunicorn configured in code: no config file, no GUNICORN_CMD_ARGS, no control socket."""

    def __init__(self, options: dict[str, Any], load_app: Callable[[], Any]) -> None:
        self._options = options
        self._load_app = load_app
        super().__init__()

    def load_config(self) -> None:
        """Apply our options, skipping any this gunicorn version does not know."""
        for name, value in self._options.items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self) -> Any:
        """Runs in each worker: load the model; a failure stops the whole server."""
        return self._load_app()


def gunicorn_options(args: argparse.Namespace, state_dir: str, banner: str) -> dict[str, Any]:
    """The gunicorn settings for ``args``."""

    def post_fork(server: Any, worker: Any) -> None:
        _die_with_parent(worker.ppid)

    def post_worker_init(worker: Any) -> None:
        _announce_once(state_dir, banner)

    return {
        "bind": [f"{_bracket(args.host)}:{args.port}"],
        "workers": args.workers,
        "worker_class": f"{ScoringWorker.__module__}.{ScoringWorker.__qualname__}",
        "timeout": args.timeout,
        "graceful_timeout": args.graceful_timeout,
        "keepalive": args.keepalive,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": "modelcd-scoring",
        "preload_app": False,
        "daemon": False,
        "control_socket_disable": True,
        "worker_tmp_dir": state_dir,
        "post_fork": post_fork,
        "post_worker_init": post_worker_init,
    }


def make_loader(model_dir: str, config: ScoringConfig, key: str | None, metrics_dir: str) -> Callable[[], Any]:
    """The per-worker app loader: a load failure becomes gunicorn's AppImportError (exit 4)."""

    def load() -> Any:
        try:
            return AsgiApp(build_app(model_dir, config, key=key, metrics_dir=metrics_dir))
        except LoadError as e:
            raise AppImportError(
                f"modelcd-scoring: cannot load model {config.model!r} version {config.version}: {e}"
            ) from e

    return load


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM; return the exit status."""
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"modelcd-scoring: {e}", file=sys.stderr)
        return 2
    model_dir = os.path.abspath(args.model_dir)
    if not os.path.isdir(model_dir):
        print(f"modelcd-scoring: model dir {model_dir!r} does not exist", file=sys.stderr)
        return 2
    key = os.environ.pop(KEY_ENV, None) or None
    for name in THREAD_ENV:
        os.environ.setdefault(name, "1")
    if config.flavor == "pyfunc":
        from .pyfunc import preimport

        preimport()  # once here, not in every worker
    return serve(args, config, model_dir, key)


def serve(args: argparse.Namespace, config: ScoringConfig, model_dir: str, key: str | None) -> int:
    """Run gunicorn in this process until it stops; return its exit status.

    The workers are forked inside ``run()``, so a worker that exits unwinds through these
    frames too: only the arbiter may turn that into a return value or remove the state dir.
    """
    _sweep_state_dirs()
    state_dir = tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-")
    banner = f"modelcd-scoring listening on http://{_bracket(args.host)}:{args.port}"
    arbiter = os.getpid()
    try:
        options = gunicorn_options(args, state_dir, banner)
        ScoringServer(options, make_loader(model_dir, config, key, state_dir)).run()
    except SystemExit as e:
        if os.getpid() != arbiter:
            raise
        return e.code if isinstance(e.code, int) else 1
    except HaltServer as e:
        # gunicorn raises this out of halt() when several workers fail to load at once;
        # workers still alive get SIGTERM from the kernel as the arbiter exits (see post_fork).
        if os.getpid() != arbiter:
            raise
        print(f"modelcd-scoring: stopped: {e.reason}", file=sys.stderr, flush=True)
        return e.exit_status if isinstance(e.exit_status, int) and e.exit_status else 1
    finally:
        if os.getpid() == arbiter:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def _sweep_state_dirs() -> None:
    """Remove the state dirs of arbiters that no longer exist."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        owner = name[len(STATE_PREFIX) :].partition("-")[0]
        if not name.startswith(STATE_PREFIX) or not owner.isdigit() or _alive(int(owner)):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _announce_once(state_dir: str, banner: str) -> None:
    """Print the ready line when the first worker has loaded the model (once per server)."""
    try:
        fd = os.open(os.path.join(state_dir, READY_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    print(banner, flush=True)


def _die_with_parent(arbiter_pid: int) -> None:
    """Ask Linux to SIGTERM this worker when the arbiter dies, so no orphan keeps the port."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != arbiter_pid:  # the arbiter died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _bracket(host: str) -> str:
    """``host`` as it appears in a URL or bind address (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
