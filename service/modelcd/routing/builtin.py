"""The built-in router: a separate process (``modelcd.routing.proxy``) that the control plane
starts, adopts after its own restart, supervises and feeds with a routing table file.

Files under ``home/router/``: ``table.json`` (the table, replaced atomically), ``router.pid``
(the process we run or adopted), ``router.log`` (its log) and ``router.lock`` (serialises
start/apply/stop between threads and processes of the control plane).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from modelcd.errors import InvalidInput, RouterError
from modelcd.routing.base import Router, RoutingTable
from modelcd.routing.wake import WAKE_FILE

if TYPE_CHECKING:
    from modelcd.config import Settings

PORT_SETTING = "MODELCD_ROUTER_PORT"
LOG_ROTATE_BYTES = 10 * 1024 * 1024  # at start, a larger router.log becomes router.log.1


class _Probe:
    """What answers on the router's port: nothing, our router (with its health), or a stranger."""

    def __init__(self, kind: str, health: dict[str, Any] | None = None, detail: str = "") -> None:
        self.kind = kind  # "down" | "ours" | "foreign"
        self.health = health or {}
        self.detail = detail


class BuiltinRouter(Router):
    """Runs ``python -m modelcd.routing.proxy`` in its own session, so that it outlives the
    control plane, and talks to it over its admin routes (``/-/healthz``, ``/-/table``,
    ``/-/reload``) on ``host:port``."""

    name = "builtin"

    def __init__(self, home: Path, host: str = "127.0.0.1", port: int = 8700, *,
                 start_timeout: float = 15.0, stop_timeout: float = 35.0, probe_timeout: float = 2.0,
                 python: str | None = None, allow_open_endpoints: bool = False,
                 mirror_worker_priority: str = "idle") -> None:
        self.dir = Path(home).resolve() / "router"
        self.table_path = self.dir / "table.json"
        self.pid_path = self.dir / "router.pid"
        self.log_path = self.dir / "router.log"
        self.lock_path = self.dir / "router.lock"
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.probe_timeout = probe_timeout  # a health check slower than this counts as a failure
        self.python = python or sys.executable
        # Serve endpoints without a key (auth none) on a non-loopback host too
        # (MODELCD_ROUTER_ALLOW_OPEN_ENDPOINTS); a router adopted after a restart keeps the value it was started with.
        self.allow_open_endpoints = allow_open_endpoints
        self.mirror_worker_priority = mirror_worker_priority
        self._admin_host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervising = False  # set by ensure_running, cleared by stop
        self._failed_probes = 0

    # -- Router interface ----------------------------------------------------------------
    def ensure_running(self) -> None:
        """Adopt the router serving our table on our port, or start one (see ``Router``)."""
        with self._lock, self._file_lock():
            self._supervising = True
            self._ensure_running_locked()

    def apply(self, table: RoutingTable) -> int:
        """Write the table file atomically, have the router reload it, and verify by reading
        the live table back (see ``Router``)."""
        with self._lock, self._file_lock():
            probe = self._probe()
            if probe.kind != "ours":
                raise RouterError(f"the router at {self.base_url} is not running ({probe.detail}); "
                                  "nothing was changed: start it with ensure_running() first")
            live = int(probe.health.get("generation", -1))
            if table.generation < live:
                raise RouterError(f"table generation {table.generation} is older than the live generation "
                                  f"{live}: another writer got there first; re-read and apply generation {live + 1}")
            if table.generation == live:
                current = self.read()
                if current == table:
                    return live
                raise RouterError(f"generation {live} is live with a different table; apply changes "
                                  f"as generation {live + 1}")
            self._write_table(table)
            status, body = self._admin("POST", "/-/reload")
            if status != 200:
                raise RouterError(f"the router rejected generation {table.generation}: "
                                  f"{body.get('message', body)}; generation {live} keeps serving")
            return self._verify(table)

    def read(self) -> RoutingTable:
        """The live table, from ``GET /-/table``."""
        status, body = self._admin("GET", "/-/table")
        if status != 200:
            raise RouterError(f"the router at {self.base_url} answered {status} to GET /-/table: {body}")
        try:
            return RoutingTable.from_dict(body)
        except InvalidInput as e:
            raise RouterError(f"the router at {self.base_url} returned an invalid table: {e.message}") from e

    def mirror_pairs(self, model: str, env: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """See ``Router.mirror_pairs`` (``GET /-/mirror/pairs``)."""
        return self._kept("/-/mirror/pairs", "shadow traffic", model, env, after, limit)

    def samples(self, model: str, env: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """See ``Router.samples`` (``GET /-/samples``)."""
        return self._kept("/-/samples", "sampled traffic", model, env, after, limit)

    def _kept(self, path: str, what: str, model: str, env: str, after: int, limit: int) -> dict[str, Any]:
        query = urlencode({"endpoint": f"{model}/{env}", "after": after, "limit": limit})
        status, body = self._admin("GET", f"{path}?{query}")
        if status != 200:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise RouterError(f"the router answered {status} for the {what} of {model}/{env}: {message}")
        return dict(body)

    def idle_seconds(self) -> dict[str, float]:
        """See ``Router.idle_seconds`` (``GET /-/activity``)."""
        status, body = self._admin("GET", "/-/activity")
        if status != 200 or not isinstance(body, dict):
            raise RouterError(f"the router answered {status} to GET /-/activity: {body}")
        return {str(k): float(v) for k, v in dict(body.get("idle_s") or {}).items()}

    def wake_file(self) -> Path:
        """See ``Router.wake_file``: ``home/router/wake.json``."""
        return self.dir / WAKE_FILE

    def endpoint_uri(self, model: str, env: str) -> str:
        """``http://host:port/model/env`` (host 127.0.0.1 when bound to every address)."""
        return f"{self.base_url}/{quote(model, safe='')}/{quote(env, safe='')}"

    def stop(self) -> None:
        """SIGTERM the router (it drains in-flight requests), wait, SIGKILL if it hangs."""
        with self._lock, self._file_lock():
            self._supervising = False
            pid = self._router_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                if not self._wait_exit(pid, self.stop_timeout):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    self._wait_exit(pid, 5.0)
            self.pid_path.unlink(missing_ok=True)
            self._proc = None

    def supervise(self) -> bool:
        """Restart the router if it died, or was unhealthy for three calls in a row (then it
        is killed first). Does nothing before ensure_running() or after stop()."""
        with self._lock:
            if not self._supervising:
                return False
            if self._proc is not None and self._proc.poll() is not None:
                self._proc = None  # reaped: a dead child must not look alive to os.kill(pid, 0)
            probe = self._probe()
            if probe.kind == "ours":
                self._failed_probes = 0
                return False
            pid = self._router_pid()
            if pid is not None and probe.kind != "down":
                self._failed_probes += 1
                if self._failed_probes < 3:
                    return False
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 5.0)
            self._failed_probes = 0
            with self._file_lock():
                self._ensure_running_locked()
            return True

    # -- helpers -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """Where this process reaches the router (loopback when it listens on every address)."""
        host = f"[{self._admin_host}]" if ":" in self._admin_host else self._admin_host
        return f"http://{host}:{self.port}"

    def pid(self) -> int | None:
        """The pid of the router process we run or adopted, if it is alive."""
        return self._router_pid()

    def _ensure_running_locked(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.table_path.exists():
            self._write_table(RoutingTable(0, {}))
        probe = self._probe()
        if probe.kind == "ours":
            self._record_pid(int(probe.health["pid"]))
            return
        pid = self._router_pid()
        if pid is not None:  # ours, but not answering yet (starting) or hung: give it the start timeout
            if self._wait_healthy(pid):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 5.0)
            probe = self._probe()
        if probe.kind == "foreign":
            raise RouterError(f"port {self.port} is taken by something that is not this modelcd router "
                              f"({probe.detail}); stop it or set {PORT_SETTING} to a free port", field=PORT_SETTING)
        self._start()

    def _start(self) -> None:
        cmd = [self.python, "-m", "modelcd.routing.proxy", "--table", str(self.table_path),
               "--host", self.host, "--port", str(self.port), "--mirror-worker-priority", self.mirror_worker_priority]
        if self.allow_open_endpoints:
            cmd.append("--allow-open-endpoints")
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        with open(self.log_path, "ab") as log:
            log_start = log.tell()
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.dir, env=env, start_new_session=True, close_fds=True)
        self._record_pid(self._proc.pid)
        if not self._wait_healthy(self._proc.pid):
            code = self._proc.poll()
            if code is None:
                self._proc.kill()
                self._proc.wait(5)
            self.pid_path.unlink(missing_ok=True)
            self._proc = None
            tail = self._log_tail(log_start)
            hint = (f"; port {self.port} is in use: stop what holds it or set {PORT_SETTING} to a free port"
                    if "in use" in tail else "")
            raise RouterError(f"the router did not become healthy on {self.base_url} within {self.start_timeout:g}s "
                              f"(exit code {code}){hint}; log {self.log_path}: {tail[-600:]}", field=PORT_SETTING)

    def _wait_healthy(self, pid: int) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid and self._proc.poll() is not None:
                return False
            if not _alive(pid):
                return False
            probe = self._probe()
            if probe.kind == "ours" and probe.health.get("pid") == pid:
                return True
            if probe.kind == "foreign":
                return False
            time.sleep(0.05)
        return False

    def _verify(self, table: RoutingTable) -> int:
        """VerifyWeight: the live router must serve exactly ``table``."""
        live = self.read()
        if live != table:
            raise RouterError(f"after reload the router serves generation {live.generation}, not the applied "
                              f"generation {table.generation} (or its content differs); check {self.log_path}")
        return live.generation

    def _write_table(self, table: RoutingTable) -> None:
        """Replace the table file atomically: temp file in the same folder, fsync, rename."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.table_path.with_name(f".table.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(table.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.table_path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _probe(self) -> _Probe:
        try:
            status, body = self._request("GET", "/-/healthz", timeout=self.probe_timeout)
        except ConnectionRefusedError:
            return _Probe("down", detail="connection refused")
        except (OSError, http.client.HTTPException, ValueError) as e:
            return _Probe("foreign", detail=f"GET /-/healthz failed: {e!r}")
        if status != 200 or not isinstance(body, dict) or body.get("router") != "modelcd":
            return _Probe("foreign", detail=f"GET /-/healthz answered {status}")
        if body.get("table") != str(self.table_path):
            return _Probe("foreign", detail=f"it is the modelcd router of another home ({body.get('table')})")
        return _Probe("ours", health=body)

    def _admin(self, method: str, path: str) -> tuple[int, Any]:
        try:
            return self._request(method, path, timeout=10.0)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise RouterError(f"the router at {self.base_url} did not answer {method} {path}: {e!r}; "
                              f"see {self.log_path}") from e

    def _request(self, method: str, path: str, timeout: float) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self._admin_host, self.port, timeout=timeout)
        try:
            conn.request(method, path, headers={"Content-Length": "0"} if method == "POST" else {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def _record_pid(self, pid: int) -> None:
        if self._read_pid() != pid:
            tmp = self.pid_path.with_name(f".router.pid.{os.getpid()}.tmp")
            tmp.write_text(f"{pid}\n")
            os.replace(tmp, self.pid_path)

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _router_pid(self) -> int | None:
        """The recorded pid if that process is alive and is our router (not a reused pid)."""
        pid = self._read_pid()
        if pid is None or not _alive(pid):
            return None
        if self._proc is not None and self._proc.pid == pid:
            return pid if self._proc.poll() is None else None
        cmdline = _cmdline(pid)
        if cmdline is not None and "modelcd.routing" not in cmdline:
            return None  # the pid was reused by another program
        return pid

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not _alive(pid):
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self, start: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read()[-4000:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialise with other control-plane processes sharing this home."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)



def from_settings(settings: Settings) -> BuiltinRouter:
    """The built-in router of ``settings.home`` on ``router_host:router_port`` (``ROUTERS``' factory)."""
    return BuiltinRouter(settings.home, host=settings.router_host, port=settings.router_port,
                         allow_open_endpoints=settings.router_allow_open_endpoints,
                         mirror_worker_priority=settings.router_mirror_worker_priority)

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str | None:
    """The command line of ``pid`` (Linux /proc); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return None
