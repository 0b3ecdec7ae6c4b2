"""The measurement that chose the scoring runtime's HTTP server.

Serves the same ``ScoringApp`` (same model, same protocol code) through candidate servers,
2 worker processes each where the server has processes, and loads each with wrk:

- gunicorn ``sync`` and ``gthread`` workers with the raw WSGI adapter (no framework);
- gunicorn's own ``asgi`` worker (gunicorn >= 24) with the raw ASGI adapter;
- gunicorn's arbiter with uvicorn workers (httptools; asyncio or uvloop) -- what
  ``python -m modelcd.scoring`` runs;
- uvicorn's own supervisor (``--workers 2``, httptools);
- granian (Rust HTTP, ASGI and WSGI interfaces);
- waitress (one process, threads).

    python bench/scoring_servers.py --duration 8 --repeat 3

Prints a markdown table of medians. Loopback only; each run bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from modelcd.scoring.server import ScoringWorker
from scoring_bench import (
    HERE,
    ModelFiles,
    Server,
    free_port,
    modelcd_server,
    run_matrix,
    start,
    stop,
    table,
    train,
    wrk_command,
)

SCENARIOS = ((1, 1), (1, 16), (100, 16))
WSGI = "modelcd.scoring.app:wsgi_from_env()"
ASGI = "modelcd.scoring.app:asgi_from_env()"
ASGI_FACTORY = "modelcd.scoring.app:asgi_from_env"
WSGI_FACTORY = "modelcd.scoring.app:wsgi_from_env"


class UvloopWorker(ScoringWorker):
    """The runtime's worker with uvloop instead of asyncio's default loop."""

    CONFIG_KWARGS = {**ScoringWorker.CONFIG_KWARGS, "loop": "uvloop"}


def _env(files: ModelFiles, metrics_dir: Path) -> dict[str, str]:
    """How the env-based app factories find the model."""
    return {
        "MODELCD_SCORING_MODEL_DIR": str(files.model_dir),
        "MODELCD_SCORING_CONFIG": str(files.config),
        "MODELCD_SCORING_METRICS_DIR": str(metrics_dir),
        "PYTHONPATH": str(HERE),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }


def _gunicorn(name: str, worker: list[str], app: str, workers: int, env: dict[str, str]) -> Server:
    """A gunicorn candidate."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", *worker, "-w", str(workers), "-b", f"127.0.0.1:{port}"]
    command += ["--keep-alive", "75", "--no-control-socket", "--log-level", "warning", app]
    base = f"http://127.0.0.1:{port}"
    return Server(name, command, f"{base}/score", f"{base}/healthz", env)


def candidates(files: ModelFiles, metrics_root: Path, workers: int) -> list[Server]:
    """Every candidate server, each with its own metrics directory."""
    made: list[Server] = []

    def env(name: str) -> dict[str, str]:
        directory = metrics_root / name.replace(" ", "_").replace("/", "_")
        directory.mkdir()
        return _env(files, directory)

    def add(name: str, build: Callable[[str, dict[str, str]], Server], needs: str | None = None) -> None:
        if needs and importlib.util.find_spec(needs) is None:
            print(f"skipping {name}: {needs} is not installed", file=sys.stderr)
            return
        made.append(build(name, env(name)))

    def uvicorn(name: str, e: dict[str, str]) -> Server:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", ASGI_FACTORY, "--workers", str(workers)]
        command += ["--http", "httptools", "--loop", "asyncio", "--no-access-log", "--lifespan", "off"]
        command += ["--timeout-keep-alive", "75", "--host", "127.0.0.1", "--port", str(port)]
        return Server(name, command, f"http://127.0.0.1:{port}/score", f"http://127.0.0.1:{port}/healthz", e)

    def granian(interface: str, factory: str) -> Callable[[str, dict[str, str]], Server]:
        def build(name: str, e: dict[str, str]) -> Server:
            port = free_port()
            command = [sys.executable, "-m", "granian", "--interface", interface, "--factory"]
            command += ["--workers", str(workers), "--no-access-log", "--log-level", "warning"]
            command += ["--host", "127.0.0.1", "--port", str(port), factory]
            return Server(name, command, f"http://127.0.0.1:{port}/score", f"http://127.0.0.1:{port}/healthz", e)

        return build

    def waitress(name: str, e: dict[str, str]) -> Server:
        port = free_port()
        command = [sys.executable, "-m", "waitress", "--threads", "4", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--call", WSGI_FACTORY]
        return Server(name, command, f"http://127.0.0.1:{port}/score", f"http://127.0.0.1:{port}/healthz", e)

    def chosen(name: str, e: dict[str, str]) -> Server:
        server = modelcd_server(files, workers)
        server.name = name
        return server

    add("gunicorn sync + WSGI", lambda n, e: _gunicorn(n, ["-k", "sync"], WSGI, workers, e))
    add("gunicorn gthread(4) + WSGI", lambda n, e: _gunicorn(n, ["-k", "gthread", "--threads", "4"], WSGI, workers, e))
    add(
        "gunicorn asgi + ASGI",
        lambda n, e: _gunicorn(n, ["-k", "asgi", "--asgi-loop", "asyncio"], ASGI, workers, e),
        needs="gunicorn.workers.gasgi",
    )
    add("gunicorn + uvicorn worker (modelcd)", chosen)
    add(
        "gunicorn + uvicorn worker, uvloop",
        lambda n, e: _gunicorn(n, ["-k", "scoring_servers.UvloopWorker"], ASGI, workers, e),
        needs="uvloop",
    )
    add("uvicorn --workers + ASGI", uvicorn, needs="uvicorn")
    add("granian asgi", granian("asgi", ASGI_FACTORY), needs="granian")
    add("granian wsgi", granian("wsgi", WSGI_FACTORY), needs="granian")
    add("waitress 1 process x4 threads + WSGI", waitress, needs="waitress")
    return made


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every candidate, one at a time, and print the table."""
    parser = argparse.ArgumentParser(description="Compare HTTP servers for the scoring runtime.")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the table shows medians (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", action="append", default=[], help="run candidates whose name contains this")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start the selected candidates together and alternate between them run by run "
        "(fairer on a machine with other load; needs memory for all of them)",
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="scoring-servers-"))
    results = {}
    commands = []
    try:
        files = train(workdir)
        metrics_root = workdir / "metrics"
        metrics_root.mkdir()
        selected = [
            server
            for server in candidates(files, metrics_root, args.workers)
            if not args.only or any(word in server.name for word in args.only)
        ]
        if args.interleave:
            try:
                for server in selected:
                    start(server, workdir)
                results.update(run_matrix(selected, files.bodies, SCENARIOS, args.duration, args.repeat))
                commands += [f"- {server.name}: `{' '.join(server.command)}`" for server in selected]
            finally:
                for server in selected:
                    stop(server)
            selected = []
        for server in selected:
            try:
                start(server, workdir)
                results.update(run_matrix([server], files.bodies, SCENARIOS, args.duration, args.repeat))
                commands.append(f"- {server.name}: `{' '.join(server.command)}`")
            except Exception as e:
                print(f"{server.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    print()
    print("Commands (model dir and config passed as MODELCD_SCORING_* env vars):")
    print("\n".join(commands))
    print(f"- load: `BODY_FILE=body-<batch>.json {' '.join(wrk_command('<url>', 16, args.duration))}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
