"""A warm parent ("zygote") of the scoring deployments of one environment.

``python -m modelcd.scoring.zygote --socket PATH --key KEY --runtime DIR --modules a,b [--idle-s N]``

Started with the environment's interpreter, it imports the scoring runtime and the heavy
modules of the environment (numpy, scikit-learn, pandas, ...) once, with every numeric
library held to one thread so that it runs no thread at all, and then answers requests on a
unix socket, one JSON line each way:

- ``{"op": "hello"}``: what it is (key, pid, modules, whether it can fork now).
- ``{"op": "fork", "argv": [...], "title": [...], "env": {...}, "cwd": D, "log": F, "runtime": R}``:
  fork a deployment; answer ``{"ok": true, "pid": N}``.
- ``{"op": "fork", "module": "modelcd.scoring.batch", "stdio": true, ...}`` with three file
  descriptors passed along (``SCM_RIGHTS``: stdin, stdout, stderr): fork a batch scoring worker
  (``python -m modelcd.scoring.batch ARGV``) that talks over those descriptors; no ``log``.
- ``{"op": "status", "pid": N}``: ``{"running": bool, "exit_code": int | null}`` of a child.
- ``{"op": "stop"}``: exit (the deployments it forked keep running).

A deployment is a child (``os.fork()`` after ``gc.freeze()``, so that the collector never
writes to the pages of the imported objects) that makes itself what ``python -m
modelcd.scoring ARGV`` with environment ``env`` in ``cwd`` would have been: its own session
and process group, stdout and stderr appended to ``log``, the parent's sockets and files
closed, signal dispositions and mask of a fresh interpreter, ``os.environ`` and the command
line and environment shown in ``/proc`` replaced by the deployment's (the control plane finds
deployments by them), thread limits of numeric libraries applied in each worker (through
threadpoolctl) and random generators reseeded in every forked process. It then runs the
scoring server's ``main``: gunicorn's arbiter, which forks the workers that load the model.
No parent-death signal is set: a deployment outlives this parent, which only reaps the
children that exit while it runs.

Imports nothing from the rest of modelcd (it is copied into bundles with the runtime).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import gc
import importlib
import json
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

PAD_ENV = "MODELCD_ZYGOTE_PAD"  # last variable of the parent's environment: room for a deployment's
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# read once when the interpreter or a native library starts: a deployment that wants another value
# than its parent started with cannot be forked from it
STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "OMP_", "KMP_", "OPENBLAS_", "GOTO_", "MKL_",
                        "BLIS_", "NVPL_", "NUMEXPR_", "VECLIB_", "CUDA_", "LC_", "LANG", "TZ")
# set per deployment after the fork
FORK_TIME_ENV = frozenset({"PYTHONPATH", "PYTHONUNBUFFERED", *THREAD_ENV})
RUNTIME_MODULES = (
    "modelcd.scoring.server", "modelcd.scoring.app", "modelcd.scoring.flavors", "modelcd.scoring.metrics",
    "modelcd.scoring.openapi", "modelcd.scoring.protocol", "modelcd.scoring.config", "modelcd.scoring.batch",
    "gunicorn.arbiter", "gunicorn.workers.base", "gunicorn.glogging", "uvicorn", "uvicorn.config",
    "uvicorn.server", "uvicorn.main", "uvicorn.loops.asyncio", "uvicorn.protocols.http.httptools_impl",
    "uvicorn.lifespan.off", "asyncio", "concurrent.futures", "email.utils", "http.cookies",
)
MAX_REQUEST = 1024 * 1024
# what a fork may run: the scoring server (a deployment) or the batch scoring worker
MODULES = ("modelcd.scoring", "modelcd.scoring.batch")
_EXITS_KEPT = 1024


class Refused(Exception):
    """A fork request this parent cannot serve; the message says why (the caller starts cold)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modelcd.scoring.zygote")
    parser.add_argument("--socket", required=True, help="unix socket to listen on")
    parser.add_argument("--key", required=True, help="the environment key this parent serves (echoed by hello)")
    parser.add_argument("--runtime", required=True, help="the runtime folder on this interpreter's PYTHONPATH")
    parser.add_argument("--modules", default="", help="comma-separated modules to import before forking")
    parser.add_argument("--idle-s", type=float, default=1800.0,
                        help="exit after this long without a request while no child of it runs")
    parser.add_argument("--title-space", default="", help="room for a deployment's command line (ignored)")
    return parser.parse_args(argv)


# -- the parent ------------------------------------------------------------------------------


class Zygote:
    """The parent's state: what it imported, its socket, its children."""

    def __init__(self, args: argparse.Namespace, fresh_signals: Mapping[int, Any]) -> None:
        self.args = args
        self.fresh_signals = dict(fresh_signals)
        self.startup_env = dict(os.environ)
        self.imported: list[str] = []
        self.failed: dict[str, str] = {}
        self.exits: dict[int, int] = {}
        self.children: set[int] = set()
        self.thread_control = False
        self.listener: socket.socket | None = None
        self.selector: selectors.BaseSelector | None = None
        self.last_request = time.monotonic()
        self.socket_ino = 0

    # imports -------------------------------------------------------------------------------

    def preload(self, modules: Sequence[str]) -> None:
        """Import the runtime and ``modules``; an import that fails is only recorded."""
        for name in THREAD_ENV:
            os.environ[name] = "1"  # no numeric library may start a pool in the parent
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in (*RUNTIME_MODULES, *modules):
                try:
                    importlib.import_module(name)
                    self.imported.append(name)
                except Exception as e:
                    self.failed[name] = f"{type(e).__name__}: {e}"[:300]
            try:
                importlib.import_module("threadpoolctl")
                self.thread_control = True
            except Exception:
                self.thread_control = False
        os.register_at_fork(after_in_child=reseed)

    def problems(self) -> list[str]:
        """Why forking would be unsafe now (an empty list: it is safe)."""
        threads = _thread_count()
        if threads != 1:
            return [f"the parent runs {threads} threads (an imported module started them); forking it is unsafe"]
        return []

    def hello(self) -> dict[str, Any]:
        return {"ok": True, "key": self.args.key, "pid": os.getpid(), "python": sys.executable,
                "modules": self.imported, "failed": self.failed, "problems": self.problems(),
                "thread_control": self.thread_control, "children": len(self.children)}

    # serving -------------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind beside the final path, then rename: a client never meets a half-ready parent."""
        path = self.args.socket
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(tmp)
        finally:
            os.umask(old)
        listener.listen(64)
        os.rename(tmp, path)
        self.socket_ino = os.stat(path).st_ino
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)

    def serve_forever(self) -> None:
        assert self.selector is not None and self.listener is not None
        while True:
            self.reap()
            if not self._still_mine():
                return
            if not self.children and time.monotonic() - self.last_request > self.args.idle_s:
                print(f"modelcd-zygote {self.args.key[:12]}: idle for {self.args.idle_s:g}s, exiting", flush=True)
                return
            if not self.selector.select(timeout=1.0):
                continue
            conn, _ = self.listener.accept()
            self.last_request = time.monotonic()
            try:
                if self.handle(conn):
                    return
            finally:
                conn.close()

    def handle(self, conn: socket.socket) -> bool:
        """Answer one request on ``conn``; True when it asked the parent to stop."""
        conn.settimeout(10.0)
        fds: list[int] = []  # descriptors passed with the request (a batch worker's stdio)
        try:
            return self._handle(conn, fds)
        finally:
            for fd in fds:  # the child has its copies
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _handle(self, conn: socket.socket, fds: list[int]) -> bool:
        try:
            request = read_message(conn, fds)
        except (OSError, ValueError) as e:
            _reply(conn, {"ok": False, "error": f"bad request: {e}"})
            return False
        op = request.get("op")
        if op == "hello":
            _reply(conn, self.hello())
        elif op == "stop":
            _reply(conn, {"ok": True})
            return True
        elif op == "status":
            _reply(conn, {"ok": True, **self.status(int(request.get("pid") or 0))})
        elif op == "fork":
            try:
                pid = self.fork(request, conn, fds)
            except Refused as e:
                _reply(conn, {"ok": False, "error": str(e)})
            else:
                _reply(conn, {"ok": True, "pid": pid})
        else:
            _reply(conn, {"ok": False, "error": f"unknown op {op!r}"})
        return False

    def status(self, pid: int) -> dict[str, Any]:
        self.reap(pid)
        if pid in self.exits:
            return {"running": False, "exit_code": self.exits[pid]}
        return {"running": pid in self.children, "exit_code": None}

    def reap(self, pid: int = -1) -> None:
        """Collect exited children (all, or ``pid``), keeping their exit codes for ``status``."""
        while self.children:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done == 0:
                return
            self.children.discard(done)
            self.exits[done] = os.waitstatus_to_exitcode(status)
            while len(self.exits) > _EXITS_KEPT:
                del self.exits[next(iter(self.exits))]
            if pid != -1:
                return

    def _still_mine(self) -> bool:
        """False once the socket file is gone or belongs to another parent (home removed, replaced)."""
        try:
            return os.stat(self.args.socket).st_ino == self.socket_ino
        except OSError:
            return False

    def close(self) -> None:
        if self._still_mine():
            with contextlib.suppress(OSError):
                os.unlink(self.args.socket)
        if self.selector is not None:
            self.selector.close()
        if self.listener is not None:
            self.listener.close()

    # forking -------------------------------------------------------------------------------

    def check(self, request: Mapping[str, Any], fds: Sequence[int] = ()) -> ForkRequest:
        """The request as a ForkRequest, or Refused naming what does not fit."""
        fork = ForkRequest.parse(request, fds)
        problems = self.problems()
        mismatch = startup_mismatch(self.startup_env, fork.env)
        if mismatch:
            problems.append(f"{', '.join(mismatch)} differ from the parent's and are read only when "
                            "the interpreter or a native library starts")
        if thread_limits(fork.env) and not self.thread_control:
            problems.append("thread limits other than 1 need threadpoolctl in the environment")
        arg_space, env_space = _regions()
        if len(_block(fork.title)) > arg_space[1] - arg_space[0]:
            problems.append("the command line does not fit the parent's")
        if len(_block(f"{k}={v}" for k, v in fork.env.items())) > env_space[1] - env_space[0]:
            problems.append("the environment does not fit the parent's")
        if problems:
            raise Refused("; ".join(problems))
        return fork

    def fork(self, request: Mapping[str, Any], conn: socket.socket, fds: Sequence[int] = ()) -> int:
        """Fork a deployment (or a batch worker); return its pid once it is in its own session and
        shows its identity."""
        fork = self.check(request, fds)
        ready_r, ready_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        gc.freeze()  # what is imported now is never scanned (nor written) by a child's collector
        pid = os.fork()
        if pid == 0:  # the deployment: never returns into this loop
            os.close(ready_r)
            _run_child(lambda: self.become(fork, conn, ready_w))
        os.close(ready_w)
        self.children.add(pid)
        ready = os.read(ready_r, 1)
        os.close(ready_r)
        if not ready:
            with contextlib.suppress(ChildProcessError):
                self.children.discard(pid)
                self.exits[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            raise Refused(f"forked process {pid} exited before it was set up (code {self.exits.get(pid)}); "
                          f"see {fork.log}")
        return pid

    def become(self, fork: ForkRequest, conn: socket.socket, ready_w: int) -> int:
        """In the child: turn into the deployment, then run the scoring server."""
        os.setsid()
        _replace_environ(fork.env)
        _retitle(fork.title, fork.env)
        os.write(ready_w, b"1")
        os.close(ready_w)
        conn.close()
        if fork.stdio:
            for target, fd in enumerate(fork.stdio):
                os.dup2(fd, target)
        self.close_inherited()
        if not fork.stdio:
            _redirect_output(fork.log)
        os.chdir(fork.cwd)
        _move_runtime(self.args.runtime, fork.runtime)
        limits = thread_limits(fork.env)
        self.reset_signals()
        if fork.module == "modelcd.scoring.batch":  # one process: no workers forked from it
            if limits:
                _limit_threads(limits)
            sys.argv = [os.path.join(fork.runtime, "modelcd", "scoring", "batch.py"), *fork.argv]
            from .batch import main as batch_main

            return batch_main(fork.argv)
        if limits:
            os.register_at_fork(after_in_child=lambda: _limit_threads(limits))
        sys.argv = [os.path.join(fork.runtime, "modelcd", "scoring", "__main__.py"), *fork.argv]
        from .server import main

        return main(fork.argv)

    def close_inherited(self) -> None:
        """Close the parent's socket and every other descriptor above stderr."""
        if self.selector is not None:
            self.selector.close()
        if self.listener is not None:
            self.listener.close()
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def reset_signals(self) -> None:
        """The dispositions a fresh interpreter starts with, and an empty signal mask."""
        for signum, handler in self.fresh_signals.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())


class ForkRequest:
    """A validated fork request."""

    def __init__(self, argv: list[str], title: list[str], env: dict[str, str], cwd: str, log: str,
                 runtime: str, module: str = "modelcd.scoring", stdio: Sequence[int] = ()) -> None:
        self.argv, self.title, self.env, self.cwd, self.log, self.runtime = argv, title, env, cwd, log, runtime
        self.module, self.stdio = module, tuple(stdio)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], fds: Sequence[int] = ()) -> ForkRequest:
        def strings(name: str) -> list[str]:
            value = raw.get(name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise Refused(f"fork request: {name!r} must be a list of strings")
            return value

        def text(name: str) -> str:
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                raise Refused(f"fork request: {name!r} must be a non-empty string")
            return value

        env = raw.get("env")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise Refused("fork request: 'env' must map names to strings")
        module = raw.get("module", "modelcd.scoring")
        if module not in MODULES:
            raise Refused(f"fork request: 'module' must be one of {', '.join(MODULES)}")
        if raw.get("stdio"):
            if len(fds) != 3:
                raise Refused(f"fork request: 'stdio' needs 3 file descriptors passed with it (got {len(fds)})")
            return cls(strings("argv"), strings("title"), dict(env), text("cwd"), "", text("runtime"), module, fds)
        if fds:
            raise Refused("fork request: file descriptors passed without 'stdio'")
        return cls(strings("argv"), strings("title"), dict(env), text("cwd"), text("log"), text("runtime"), module)


# -- pure helpers ----------------------------------------------------------------------------


def startup_mismatch(parent: Mapping[str, str], child: Mapping[str, str]) -> list[str]:
    """Names read only at start-up whose values differ between the parent's and ``child``'s env."""
    names = {n for n in (*parent, *child) if n.startswith(STARTUP_ENV_PREFIXES) and n not in FORK_TIME_ENV
             and n != PAD_ENV}
    return sorted(n for n in names if parent.get(n) != child.get(n))


def thread_limits(env: Mapping[str, str]) -> dict[str, int]:
    """threadpoolctl limits for ``env`` (the server's defaults: 1 thread) when any is not 1."""
    wanted = {"openmp": env.get("OMP_NUM_THREADS", "1"), "openblas": env.get("OPENBLAS_NUM_THREADS", "1"),
              "mkl": env.get("MKL_NUM_THREADS", "1")}
    limits = {}
    for api, value in wanted.items():
        try:
            limits[api] = max(1, int(value))
        except ValueError:
            limits[api] = 1
    return limits if any(n != 1 for n in limits.values()) else {}


def _block(items: Any) -> bytes:
    return b"".join(os.fsencode(item) + b"\0" for item in items)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _regions() -> tuple[tuple[int, int], tuple[int, int]]:
    """(arg_start, arg_end), (env_start, env_end) of this process (``/proc/self/stat``)."""
    with open("/proc/self/stat") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2:].split()
    arg_start, arg_end, env_start, env_end = (int(v) for v in fields[45:49])
    return (arg_start, arg_end), (env_start, env_end)


def _retitle(title: Sequence[str], env: Mapping[str, str]) -> None:
    """Show ``title`` as this process's command line and ``env`` as its environment in ``/proc``
    (what ``ps`` and the control plane read), padded with NULs. Only after ``_replace_environ``:
    then no C pointer into the old environment strings is left."""
    for (start, end), data in zip(_regions(), (_block(title), _block(f"{k}={v}" for k, v in env.items())),
                                  strict=True):
        size = end - start
        if len(data) > size or start == 0:
            raise Refused("no room to show the deployment's command line and environment")
        ctypes.memmove(start, data.ljust(size, b"\0"), size)


def _replace_environ(env: Mapping[str, str]) -> None:
    """``os.environ`` (and the C environment) = ``env`` exactly."""
    os.environ.clear()
    os.environ.update(env)


def _redirect_output(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)


def _move_runtime(old: str, new: str) -> None:
    """Import the runtime's not-yet-imported modules from the deployment's bundle (identical
    files) rather than from the bundle the parent was started with, which may be removed."""
    old, new = os.path.abspath(old), os.path.abspath(new)
    if old == new:
        return
    sys.path[:] = [new if os.path.abspath(p or ".") == old else p for p in sys.path]
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__path__", None)
        if (name == "modelcd" or name.startswith("modelcd.")) and isinstance(path, list):
            module.__path__ = [new + p[len(old):] if p.startswith(old) else p for p in path]


def _limit_threads(limits: Mapping[str, int]) -> None:
    """Apply thread limits (at most one per CPU: OpenBLAS ignores a larger number set at run time)."""
    from threadpoolctl import ThreadpoolController

    cpus = os.cpu_count() or 1
    controller = ThreadpoolController()
    for api, n in limits.items():  # by library (OpenBLAS and MKL are both "blas" to threadpoolctl)
        controller.select(internal_api=api).limit(limits=min(n, cpus))


def reseed() -> None:
    """After any fork from the parent: new random state for ``random`` and numpy's global generator."""
    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def _run_child(body: Callable[[], int]) -> None:
    """Run ``body`` in a forked process and exit with its status: whatever happens (a gunicorn
    worker's SystemExit included), never return into the parent's loop."""
    code = 1
    try:
        code = body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code if 0 <= code <= 255 else 1)


def read_message(conn: socket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    """One JSON object sent as a line on ``conn`` (either way: request or reply); ValueError if it
    is not. With ``fds``, file descriptors passed along (at most 3) are appended to it."""
    data = b""
    while not data.endswith(b"\n"):
        if fds is None:
            chunk = conn.recv(65536)
        else:
            chunk, passed, _flags, _addr = socket.recv_fds(conn, 65536, 3)
            fds.extend(passed)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("message too large")
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        raise ValueError(f"not JSON: {data[:200]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {data[:200]!r}")
    return value


def _reply(conn: socket.socket, value: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(value).encode() + b"\n")


def main(argv: Sequence[str] | None = None) -> int:
    fresh = {s: signal.getsignal(s) for s in signal.valid_signals()}
    fresh = {s: h for s, h in fresh.items() if h is not None}
    args = parse_args(argv)
    os.environ.pop(PAD_ENV, None)  # its bytes stay, as room for a deployment's environment
    zygote = Zygote(args, fresh)
    zygote.preload([m for m in args.modules.split(",") if m])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    zygote.listen()
    print(f"modelcd-zygote {args.key[:12]} ready (pid {os.getpid()}): imported {len(zygote.imported)} modules"
          + (f", failed {sorted(zygote.failed)}" if zygote.failed else "")
          + (f"; {'; '.join(zygote.problems())}" if zygote.problems() else ""), flush=True)
    try:
        zygote.serve_forever()
    finally:
        zygote.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
