"""Benchmark of the built-in router: latency it adds over calling a backend directly, the
time a table switch takes, and failures during switches under load.

    python bench/router_bench.py [--duration 5] [--repeat 3] [--switches 50] [--compare] [--no-scoring]
                                 [--only-auth]

Everything runs on 127.0.0.1: a minimal fast backend (asyncio, fixed JSON answer), modelcd's
own scoring server with a small sklearn model (when ``modelcd.scoring`` and scikit-learn are
installed), the real router process started through ``BuiltinRouter``, and ``wrk`` (bounded by
``--duration``) posting a small scoring body. Prints markdown. A keyed endpoint (``auth: key``,
four valid keys, the request's key the last one checked) and an open one on the same backend are
measured side by side, their runs interleaved; ``--only-auth`` runs just that section.
``--compare`` also measures the other designs that were considered for the router (same backend, same load):

- ``asyncio+httptools (uvloop)``: the router as shipped (``modelcd.routing.proxy``)
- ``asyncio+httptools (asyncio loop)``: the same code on the standard event loop
- ``uvicorn+ASGI``: uvicorn (httptools, uvloop) with a raw ASGI app forwarding over a pooled
  asyncio-streams upstream client
- ``threaded``: ``ThreadingHTTPServer`` forwarding with per-thread keep-alive ``http.client``

The prototypes forward every request to one backend (no table, no failover): a lower bound
for their design, so the comparison does not favour the shipped router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelcd.targets.process import free_port

BODY = b'{"data": [[5.1, 3.5, 1.4, 0.2]]}'
BENCH_KEYS = ("bench-key-1", "bench-key-2", "bench-key-3", "mk_8wJ2pQx0V7rL4nZs1Tq9uHcE3yBgD6fA")
ANSWER = b'{"predictions": [0]}'
WRK = shutil.which("wrk") or "/usr/bin/wrk"


# -- servers run as subprocesses of this script -------------------------------------------
def serve_backend(port: int) -> None:
    """A minimal keep-alive HTTP/1.1 server answering every request with ANSWER."""
    import httptools

    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(ANSWER),
        ANSWER,
    )

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(response)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port)
        await server.serve_forever()

    _run(main())


def serve_uvicorn(port: int, backend_port: int) -> None:
    """Prototype: uvicorn + raw ASGI app + pooled asyncio-streams upstream client."""
    import httptools
    import uvicorn

    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    class Response:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []
            self.body: list[bytes] = []
            self.done = False

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() not in (b"connection", b"keep-alive", b"transfer-encoding"):
                self.headers.append((name.lower(), value))

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            self.done = True

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        reader, writer = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", backend_port)
        head = [b"%s %s HTTP/1.1\r\n" % (scope["method"].encode(), scope["raw_path"])]
        head += [k + b": " + v + b"\r\n" for k, v in scope["headers"] if k not in (b"connection", b"content-length")]
        writer.write(b"".join(head) + b"content-length: %d\r\n\r\n" % len(body) + body)
        response = Response()
        parser = httptools.HttpResponseParser(response)
        while not response.done:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("backend closed")
            parser.feed_data(data)
        idle.append((reader, writer))
        await send(
            {
                "type": "http.response.start",
                "status": parser.get_status_code(),
                "headers": [*response.headers, (b"x-modelcd-version", b"1")],
            }
        )
        await send({"type": "http.response.body", "body": b"".join(response.body)})

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


def serve_threaded(port: int, backend_port: int) -> None:
    """Prototype: ThreadingHTTPServer + per-thread keep-alive http.client upstream."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", backend_port)
            conn.request("POST", self.path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            out = [b"HTTP/1.1 %d OK\r\n" % resp.status]
            out += [
                b"%s: %s\r\n" % (k.encode(), v.encode())
                for k, v in resp.getheaders()
                if k.lower() not in ("connection", "transfer-encoding", "content-length")
            ]
            out.append(b"x-modelcd-version: 1\r\ncontent-length: %d\r\n\r\n" % len(data))
            self.wfile.write(b"".join(out) + data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def _run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


# -- helpers ------------------------------------------------------------------------------


def wait_http(port: int, path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("POST", path, BODY)
            if conn.getresponse().status < 500:
                conn.close()
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


@contextlib.contextmanager
def process(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, connections: int, duration: float, script: Path, pid: int | None = None) -> dict[str, float]:
    """One wrk run; p50/p99 in ms, requests/s, failed requests, and CPU µs per request of
    process ``pid`` (the router) when given."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        [WRK, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    p = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if "50" not in p or "99" not in p:
        raise RuntimeError(f"cannot read wrk's latency distribution:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu = (cpu_seconds(pid) - cpu0) * 1e6 / max(total, 1) if pid else 0.0
    return {
        "p50": _ms(p["50"]),
        "p99": _ms(p["99"]),
        "cpu_us": cpu,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "failed": errors + (int(non2xx.group(1)) if non2xx else 0),
    }


def median_runs(
    url: str, connections: int, args: argparse.Namespace, script: Path, pid: int | None = None
) -> dict[str, float]:
    runs = [wrk(url, connections, args.duration, script, pid) for _ in range(args.repeat)]
    return {k: statistics.median(r[k] for r in runs) if k != "failed" else sum(r[k] for r in runs) for k in runs[0]}


def fmt(ms: float) -> str:
    return f"{ms * 1000:.0f} µs" if abs(ms) < 1 else f"{ms:.2f} ms"


# -- the benchmark ------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--repeat", type=int, default=3, help="wrk runs per cell (median reported)")
    p.add_argument("--switches", type=int, default=50)
    p.add_argument("--compare", action="store_true", help="also measure the alternative designs")
    p.add_argument("--no-scoring", action="store_true", help="skip the modelcd.scoring backend")
    p.add_argument("--only-auth", action="store_true", help="only the keyed vs open endpoint section")
    p.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-alt", nargs=3, metavar=("KIND", "PORT", "BACKEND_PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return 0
    if args.serve_alt:
        kind, port, backend_port = args.serve_alt
        {"uvicorn": serve_uvicorn, "threaded": serve_threaded}[kind](int(port), int(backend_port))
        return 0
    if not os.path.exists(WRK):
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        run(Path(tmp), stack, args)
    return 0


def run(tmp: Path, stack: contextlib.ExitStack, args: argparse.Namespace) -> None:
    """Start the backends and the router, then print every section."""
    from modelcd.routing.base import Backend, EndpointRoute, RoutingTable
    from modelcd.routing.builtin import BuiltinRouter

    script = tmp / "post.lua"
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{BODY.decode()}'\nwrk.headers['Content-Type'] = 'application/json'\n"
    )
    keyed_script = tmp / "post_keyed.lua"
    keyed_script.write_text(script.read_text() + f"wrk.headers['Authorization'] = 'Bearer {BENCH_KEYS[-1]}'\n")
    b1, b2 = free_port(), free_port()
    stack.enter_context(process(__file__, "--serve-backend", str(b1)))
    stack.enter_context(process(__file__, "--serve-backend", str(b2)))
    wait_http(b1, "/score")
    wait_http(b2, "/score")
    digests = tuple(hashlib.sha256(k.encode()).hexdigest() for k in BENCH_KEYS)
    extra: dict[str, EndpointRoute] = {
        "iris/open": EndpointRoute((Backend("o1", 1, f"http://127.0.0.1:{b1}", 100),)),
        "iris/keyed": EndpointRoute((Backend("k1", 1, f"http://127.0.0.1:{b1}", 100),), "key", digests),
    }
    scoring_port = None if args.no_scoring or args.only_auth else start_scoring(tmp, stack)
    if scoring_port is not None:
        extra["iris/scoring"] = EndpointRoute((Backend("s1", 1, f"http://127.0.0.1:{scoring_port}", 100),))

    def split(gen: int, w1: int) -> RoutingTable:
        return RoutingTable(
            gen,
            {
                "iris/production": EndpointRoute(
                    (
                        Backend("d1", 1, f"http://127.0.0.1:{b1}", w1),
                        Backend("d2", 2, f"http://127.0.0.1:{b2}", 100 - w1),
                    )
                ),
                **extra,
            },
        )

    router = BuiltinRouter(tmp / "home", "127.0.0.1", free_port())
    router.ensure_running()
    stack.callback(router.stop)
    router.apply(split(1, 100))
    uri = router.endpoint_uri("iris", "production") + "/score"
    wait_http(router.port, "/iris/production/score")
    print(
        f"# Router benchmark\n\n{os.cpu_count()} cores (load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}), wrk -t1, {args.duration:g} s per run, median of "
        f"{args.repeat} runs, POST of a {len(BODY)} B JSON body. Router CPU/req is the router process's "
        "user+system CPU time divided by the requests it served.\n"
    )
    wait_http(router.port, "/iris/open/score")
    if args.only_auth:
        auth_overhead(router, args, script, keyed_script)
        return
    latency_table(
        "fast backend (asyncio + httptools, fixed answer)",
        f"http://127.0.0.1:{b1}/score",
        uri,
        args,
        script,
        router.pid(),
    )
    if scoring_port is not None:
        latency_table(
            "modelcd.scoring backend (sklearn LogisticRegression on iris, 1 worker)",
            f"http://127.0.0.1:{scoring_port}/score",
            router.endpoint_uri("iris", "scoring") + "/score",
            args,
            script,
            router.pid(),
        )
    auth_overhead(router, args, script, keyed_script)
    gen = switch_times(router, split, args.switches)
    switch_under_load(router, split, uri, gen, args, script)
    if args.compare:
        compare(uri, router.pid(), b1, args, script)
    print(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")


def start_scoring(tmp: Path, stack: contextlib.ExitStack) -> int | None:
    """modelcd's scoring server with a small sklearn model, if both are installed."""
    import importlib.util

    if importlib.util.find_spec("modelcd.scoring") is None or importlib.util.find_spec("sklearn") is None:
        return None
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, target = load_iris(return_X_y=True)
    model_dir = tmp / "model"
    model_dir.mkdir()
    joblib.dump(LogisticRegression(max_iter=1000).fit(features, target), model_dir / "model.pkl")
    config = tmp / "scoring.json"
    config.write_text(
        json.dumps(
            {"model": "iris", "version": 1, "flavor": "sklearn", "model_file": "model.pkl", "sample": json.loads(BODY)}
        )
    )
    port = free_port()
    stack.enter_context(
        process(
            "-m",
            "modelcd.scoring",
            "--model-dir",
            str(model_dir),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        )
    )
    wait_http(port, "/score", timeout=60)
    return port


def latency_table(
    title: str, direct: str, routed: str, args: argparse.Namespace, script: Path, pid: int | None
) -> None:
    print(f"## Added latency: {title}\n")
    print(
        "| concurrency | direct p50 | router p50 | added p50 | direct p99 | router p99 | added p99 "
        "| direct req/s | router req/s | router CPU/req | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in (1, 16):
        d = median_runs(direct, c, args, script)
        r = median_runs(routed, c, args, script, pid)
        print(
            f"| {c} | {fmt(d['p50'])} | {fmt(r['p50'])} | **{fmt(r['p50'] - d['p50'])}** | {fmt(d['p99'])} "
            f"| {fmt(r['p99'])} | {fmt(r['p99'] - d['p99'])} | {d['rps']:.0f} | {r['rps']:.0f} "
            f"| {r['cpu_us']:.0f} µs | {int(d['failed'] + r['failed'])} |",
            flush=True,
        )
    print()


def auth_overhead(router: Any, args: argparse.Namespace, script: Path, keyed_script: Path) -> None:
    """The same fast backend behind an open endpoint and a keyed one, wrk runs alternating
    between them (open first on even rounds, keyed first on odd ones) so drift in the
    machine's load hits both alike; medians of ``--repeat`` runs each."""
    from modelcd.routing.proxy import key_accepted

    base = f"http://127.0.0.1:{router.port}/iris"
    pid = router.pid()
    print(f"## Keyed endpoint vs open endpoint (fast backend, {len(BENCH_KEYS)} valid keys)\n")
    print("| concurrency | open p50 | keyed p50 | added p50 | open p99 | keyed p99 | open req/s | keyed req/s "
          "| open CPU/req | keyed CPU/req | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in (1, 16):
        runs: dict[str, list[dict[str, float]]] = {"open": [], "keyed": []}
        for i in range(args.repeat):
            for name in (("open", "keyed") if i % 2 == 0 else ("keyed", "open")):
                runs[name].append(wrk(f"{base}/{name}/score", c, args.duration,
                                      keyed_script if name == "keyed" else script, pid))
        o, k = ({key: statistics.median(r[key] for r in runs[n]) for key in runs[n][0]} for n in ("open", "keyed"))
        failed = sum(r["failed"] for n in runs for r in runs[n])
        print(f"| {c} | {fmt(o['p50'])} | {fmt(k['p50'])} | **{fmt(k['p50'] - o['p50'])}** | {fmt(o['p99'])} "
              f"| {fmt(k['p99'])} | {o['rps']:.0f} | {k['rps']:.0f} | {o['cpu_us']:.0f} µs | {k['cpu_us']:.0f} µs "
              f"| {int(failed)} |", flush=True)
    digests = tuple(hashlib.sha256(key.encode()).digest() for key in BENCH_KEYS)
    header = f"Bearer {BENCH_KEYS[-1]}".encode()
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        key_accepted(header, digests)
    per_check = (time.perf_counter() - t0) / n * 1e6
    print(f"\nThe check alone (`key_accepted`, sha256 + {len(digests)} constant-time compares, in-process): "
          f"**{per_check:.2f} µs** per request.\n")


def switch_times(router: Any, split: Any, n: int) -> int:
    """apply() wall time: file write + reload + read-back verification."""
    times, gen = [], 1
    for i in range(n):
        gen += 1
        t0 = time.perf_counter()
        assert router.apply(split(gen, 100 if i % 2 else 0)) == gen
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    print("## Table switch\n")
    print(
        f"`apply()` until the live router serves the new generation (verified by read-back), {n} switches: "
        f"median **{statistics.median(times):.2f} ms**, p99 {times[min(n - 1, int(n * 0.99))]:.2f} ms, "
        f"max {times[-1]:.2f} ms\n"
    )
    return gen


def switch_under_load(router: Any, split: Any, uri: str, gen: int, args: argparse.Namespace, script: Path) -> None:
    """wrk at concurrency 16 while the table flips between the two backends every 50 ms."""
    result: dict[str, float] = {}
    t = threading.Thread(target=lambda: result.update(wrk(uri, 16, args.duration, script)))
    t.start()
    switches = 0
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        gen += 1
        router.apply(split(gen, [100, 0, 50, 90][gen % 4]))
        switches += 1
        time.sleep(0.05)
    t.join()
    print(
        f"Under load (wrk -c16, {args.duration:g} s) with {switches} switches: {result['rps']:.0f} req/s, "
        f"**{int(result['failed'])} failed requests** (socket errors + non-2xx).\n"
    )


def compare(uri: str, router_pid: int | None, backend_port: int, args: argparse.Namespace, script: Path) -> None:
    """The same load through each candidate design, fast backend."""
    print("## Designs compared (fast backend)\n")
    print("| design | c=1 added p50 | c=1 added p99 | c=16 added p50 | c=16 added p99 | c=16 req/s | CPU/req (c=16) |")
    print("|---|---|---|---|---|---|---|")
    direct = {c: median_runs(f"http://127.0.0.1:{backend_port}/score", c, args, script) for c in (1, 16)}
    table = Path(tempfile.mkdtemp()) / "table.json"
    table.write_text(
        json.dumps(
            {
                "generation": 1,
                "endpoints": {
                    "iris/production": {
                        "backends": [
                            {"id": "d1", "version": 1, "url": f"http://127.0.0.1:{backend_port}", "weight": 100}
                        ]
                    }
                },
            }
        )
    )
    designs = {
        "asyncio+httptools, uvloop (shipped)": (None, uri, router_pid),
        "asyncio+httptools, asyncio loop": (
            ["-m", "modelcd.routing.proxy", "--table", str(table), "--loop", "asyncio"],
            "/iris/production/score",
            None,
        ),
        "uvicorn + raw ASGI + pooled streams": ([__file__, "--serve-alt", "uvicorn"], "/score", None),
        "ThreadingHTTPServer + http.client": ([__file__, "--serve-alt", "threaded"], "/score", None),
    }
    for name, (cmd, target, pid) in designs.items():
        if cmd is None:
            rows = {c: median_runs(target, c, args, script, pid) for c in (1, 16)}
        else:
            port = free_port()
            extra = ["--port", str(port)] if "modelcd.routing.proxy" in cmd else [str(port), str(backend_port)]
            with process(*cmd, *extra) as proc:
                wait_http(port, target)
                url = f"http://127.0.0.1:{port}{target}"
                rows = {c: median_runs(url, c, args, script, proc.pid) for c in (1, 16)}
        print(
            f"| {name} | {fmt(rows[1]['p50'] - direct[1]['p50'])} | {fmt(rows[1]['p99'] - direct[1]['p99'])} "
            f"| {fmt(rows[16]['p50'] - direct[16]['p50'])} | {fmt(rows[16]['p99'] - direct[16]['p99'])} "
            f"| {rows[16]['rps']:.0f} | {rows[16]['cpu_us']:.0f} µs |",
            flush=True,
        )
    print(
        f"\nDirect to the backend: c=1 p50 {fmt(direct[1]['p50'])}, c=16 p50 {fmt(direct[16]['p50'])}, "
        f"{direct[16]['rps']:.0f} req/s.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
