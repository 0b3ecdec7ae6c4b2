"""Warm starts for the ``process`` target: one parent process ("zygote",
``modelcd.scoring.zygote``) per environment that has imported the scoring runtime and the
environment's heavy modules; a deployment is a fork of it (see that module for what the child
does to become a deployment).

Parents live in ``home/zygotes/``: ``{key}.sock`` (the unix socket), ``{key}.log`` (their
output) and ``{key}.lock`` (held while one is started). The key covers the interpreter, the
environment and the scoring runtime's files, so a parent only forks deployments whose bundle
would run exactly the code it imported. A parent is started on demand and found again by its
socket after a restart of the control plane; it is not tied to the control plane's life, and
the deployments it forked are not tied to its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from modelcd.builders.imports import heavy_modules
from modelcd.scoring.zygote import PAD_ENV, THREAD_ENV, read_message

PARENT_MODULE = "modelcd.scoring.zygote"
ENV_ROOM = 32768  # bytes of environment a forked deployment may show in /proc
TITLE_ROOM = 4096  # bytes of command line
START_TIMEOUT_S = 60.0
MAX_SOCKET_PATH = 107
ENV_MARKER = "modelcd-env.json"
class WarmUnavailable(Exception):
    """No parent can fork this deployment; the message says why (the caller starts it cold)."""


def runtime_digest(runtime: Path) -> str:
    """sha256 over the runtime's Python files (relative name and bytes)."""
    h = hashlib.sha256()
    for path in sorted(runtime.rglob("*.py")):
        h.update(str(path.relative_to(runtime)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def zygote_key(python: str, runtime: str) -> str:
    """A parent's name: its interpreter (so its environment) and the digest of its runtime."""
    return hashlib.sha256(f"{python}\0{runtime}".encode()).hexdigest()[:24]


def parent_env(base: Mapping[str, str], runtime: Path) -> dict[str, str]:
    """A parent's environment: the deployments' inherited basics with numeric libraries held to
    one thread, and last the room a deployment's environment is written into."""
    env = {k: v for k, v in base.items() if k not in THREAD_ENV}
    env.update(PYTHONPATH=str(runtime), PYTHONUNBUFFERED="1")
    env.update(dict.fromkeys(THREAD_ENV, "1"))
    env[PAD_ENV] = "." * ENV_ROOM
    return env


class WarmStarts:
    """The parents of one home, started on demand; thread-safe."""

    def __init__(self, home: Path) -> None:
        self.dir = Path(home).absolute() / "zygotes"
        self._lock = threading.Lock()
        self._started: dict[str, subprocess.Popen[bytes]] = {}  # started here: reaped here
        self._digests: dict[Path, str] = {}

    def socket_path(self, key: str) -> Path:
        return self.dir / f"{key}.sock"

    def fork(self, python: str, bundle: Path, base_env: Mapping[str, str],
             request: Mapping[str, Any], fds: Sequence[int] = ()) -> tuple[int, str]:
        """Fork a deployment (or, with ``fds``, a batch worker on those stdin, stdout and stderr)
        from the parent of ``bundle``'s environment; return its pid and the parent's key. Raises
        WarmUnavailable: no parent answers (then one is started in the background, for the next
        ones), or it refused (the reason)."""
        key = self.key(python, bundle)
        hello = self._usable(key)
        if hello is None:
            self.spawn(python, bundle, base_env)
            raise WarmUnavailable("no parent process for this environment yet; starting one for the next "
                                  "deployments")
        if hello.get("problems"):
            raise WarmUnavailable("; ".join(hello["problems"]))
        reply = call(self.socket_path(key), {"op": "fork", **request}, timeout=30.0, fds=fds)
        if not reply.get("ok"):
            raise WarmUnavailable(f"the parent refused: {reply.get('error')}")
        return int(reply["pid"]), key

    def ensure(self, python: str, bundle: Path, base_env: Mapping[str, str],
               timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Start the parent of ``bundle``'s environment unless one runs; wait until it answers
        and return its hello."""
        key = self.key(python, bundle)
        deadline = time.monotonic() + timeout_s
        while True:
            self.spawn(python, bundle, base_env)  # again if one that was starting exited
            hello = self._usable(key)
            if hello is not None:
                return hello
            with self._lock:
                proc = self._started.get(key)
            if proc is not None and proc.poll() is not None:
                raise WarmUnavailable(f"the parent {key[:12]} exited with code {proc.returncode} while starting; "
                                      f"see {self.dir / (key + '.log')}")
            if time.monotonic() > deadline:
                raise WarmUnavailable(f"the parent {key[:12]} was not ready within {timeout_s:g}s; "
                                      f"see {self.dir / (key + '.log')}")
            time.sleep(0.05)

    def exit_code(self, key: str, pid: int) -> int | None:
        """The exit code of ``pid`` as its parent saw it (None: unknown or still running)."""
        try:
            reply = call(self.socket_path(key), {"op": "status", "pid": pid}, timeout=5.0)
        except WarmUnavailable:
            return None
        code = reply.get("exit_code")
        return code if isinstance(code, int) else None

    def hello(self, key: str) -> dict[str, Any] | None:
        try:
            return call(self.socket_path(key), {"op": "hello"}, timeout=5.0)
        except WarmUnavailable:
            return None

    def stop_all(self) -> list[int]:
        """Ask every parent of this home to exit and wait (5 s at most) until they did (their
        deployments keep running); return their pids."""
        stopped = []
        for sock in sorted(self.dir.glob("*.sock")) if self.dir.is_dir() else []:
            with contextlib.suppress(WarmUnavailable):
                pid = call(sock, {"op": "hello"}, timeout=5.0).get("pid")
                call(sock, {"op": "stop"}, timeout=5.0)
                stopped.append(int(pid or 0))
        with self._lock:
            for proc in self._started.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
        deadline = time.monotonic() + 5.0
        while any(_running(pid) for pid in stopped) and time.monotonic() < deadline:
            time.sleep(0.02)
        return stopped

    # -- parents -------------------------------------------------------------------------

    def key(self, python: str, bundle: Path) -> str:
        """The key of the parent for ``bundle`` run by ``python``; WarmUnavailable when its
        socket path would be too long."""
        with self._lock:
            digest = self._digests.get(bundle) or runtime_digest(bundle / "runtime")
            self._digests[bundle] = digest
        if not (bundle / "runtime" / "modelcd" / "scoring" / "zygote.py").is_file():
            raise WarmUnavailable("the bundle's scoring runtime predates warm starts; build the version again")
        key = zygote_key(python, digest)
        sock = self.socket_path(key)
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise WarmUnavailable(f"the parent's socket path {sock} is longer than {MAX_SOCKET_PATH} bytes; "
                                  "use a shorter MODELCD_HOME")
        return key

    def _usable(self, key: str) -> dict[str, Any] | None:
        hello = self.hello(key)
        return hello if hello is not None and hello.get("key") == key else None

    def spawn(self, python: str, bundle: Path, base_env: Mapping[str, str]) -> None:
        """Start the parent of ``bundle``'s environment in the background, unless one answers
        or is starting (its pid file names a live process started for it)."""
        key = self.key(python, bundle)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            for k, proc in list(self._started.items()):
                if proc.poll() is not None:
                    del self._started[k]
        with _flock(self.dir / f"{key}.lock"):
            if self._usable(key) is not None or _starting(self.dir / f"{key}.pid", key):
                return
            sock = self.socket_path(key)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()  # a dead parent's: it did not answer
            env_dir = Path(python).parent.parent
            argv = [python, "-m", PARENT_MODULE, "--socket", str(sock), "--key", key,
                    "--runtime", str(bundle / "runtime"),
                    "--modules", ",".join(heavy_modules(_requirements(env_dir))), "--title-space", "." * TITLE_ROOM]
            with open(self.dir / f"{key}.log", "ab") as out:
                try:
                    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=self.dir, env=parent_env(base_env, bundle / "runtime"),
                                            start_new_session=True, close_fds=True)
                except OSError as e:
                    raise WarmUnavailable(f"cannot start a parent with {python}: {e.strerror}") from e
            (self.dir / f"{key}.pid").write_text(f"{proc.pid}\n")
            with self._lock:
                self._started[key] = proc


def call(sock: Path, request: Mapping[str, Any], timeout: float, fds: Sequence[int] = ()) -> dict[str, Any]:
    """One request to a parent (``fds`` passed along with it), its JSON answer; WarmUnavailable
    when it cannot be asked."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(sock))
            data = json.dumps(request).encode() + b"\n"
            if fds:
                sent = socket.send_fds(conn, [data], list(fds))
                data = data[sent:]
            conn.sendall(data)
            return read_message(conn)
    except OSError as e:
        raise WarmUnavailable(f"cannot reach the parent at {sock}: {e.strerror or e}") from None
    except ValueError as e:
        raise WarmUnavailable(f"the parent at {sock} answered {e}") from None


def _requirements(env_dir: Path) -> list[str]:
    try:
        marker = json.loads((env_dir / ENV_MARKER).read_text())
    except (OSError, ValueError):
        return []
    reqs = marker.get("requirements") if isinstance(marker, dict) else None
    return [r for r in reqs if isinstance(r, str)] if isinstance(reqs, list) else []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _starting(pid_file: Path, key: str) -> bool:
    """Whether the pid in ``pid_file`` is a live parent process started for ``key``."""
    try:
        proc = psutil.Process(int(pid_file.read_text().strip()))
        return proc.status() != psutil.STATUS_ZOMBIE and key in proc.cmdline()
    except (OSError, ValueError, psutil.Error):
        return False


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
