"""The ``process`` target: each deployment is a scoring process on 127.0.0.1, started from
a bundle (see ``modelcd.builders.bundle``) in its own session so that it outlives the control
plane, and found again after a restart by pid, identity and health.

With warm starts (the default) a deployment is forked from its environment's parent process
(``modelcd.targets.warm``), which has imported the scoring runtime and the heavy modules
already; otherwise, or when no parent can fork it, it is a fresh interpreter ("cold"). Both
look the same from here: same command line, environment, session, log and health."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from modelcd.domain import Deployment
from modelcd.errors import Cancelled, DeployError
from modelcd.inherited import inherited_env
from modelcd.targets.base import DeploySpec, Log, RunningDeployment, Target
from modelcd.targets.warm import WarmStarts, WarmUnavailable

HOST = "127.0.0.1"
ID_ENV = "MODELCD_DEPLOYMENT_ID"  # set in every scoring process: identity that survives exec
KEY_ENV = "MODELCD_SCORING_KEY"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PORT_TAKEN = re.compile(r"address already in use|eaddrinuse|errno 98\]|connection in use", re.IGNORECASE)
_POLL_S = 0.02


class Started:
    """A scoring process we started (a deployment, a batch worker): a child of ours (cold) or of
    its environment's parent (warm)."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None,
                 warm: tuple[WarmStarts, str] | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.warm = warm

    def poll(self) -> int | None:
        """Its exit code once it exited (-1 when its parent could not tell), else None."""
        if self.popen is not None:
            return self.popen.poll()
        try:
            if psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        assert self.warm is not None
        code = self.warm[0].exit_code(self.warm[1], self.pid)
        return -1 if code is None else code

    def wait(self, timeout: float) -> int | None:
        """Its exit code once it exits within ``timeout`` seconds (as ``poll``), else None."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return code

    def kill(self) -> None:
        """SIGKILL its process group and wait until it is gone."""
        if self.poll() is not None:  # exited (and maybe reaped): its pid may be someone else's now
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # cold: unreaped; warm: its parent reaps it
        if self.popen is not None:
            self.popen.wait()
            return
        self.wait(5.0)


class _PortTaken(Exception):
    """The process could not bind its port (grabbed between our probe and its bind)."""


class ProcessTarget(Target):
    """Scoring processes on this machine, logs in ``home/deployments/{id}.log``."""

    name = "process"

    def __init__(self, home: Path, grace_s: float = 10.0, warm_starts: bool = True) -> None:
        self.home = Path(home).absolute()
        self.grace_s = grace_s
        self.warm = WarmStarts(self.home) if warm_starts else None
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # started here: reap them
        self._lock = threading.Lock()

    def log_path(self, deployment_id: str) -> Path:
        """Where the output of deployment ``deployment_id`` goes."""
        return self.home / "deployments" / f"{deployment_id}.log"

    # -- Target --------------------------------------------------------------------------

    def create(self, spec: DeploySpec, log: Log, cancel: threading.Event) -> RunningDeployment:
        """See ``Target.create``. Retries once on a new port if its port was taken."""
        if not _SAFE_ID.match(spec.deployment_id):
            raise DeployError(f"deployment id {spec.deployment_id!r} is not a safe file name")
        bundle = _check_bundle(spec)
        for attempt in (1, 2):
            if cancel.is_set():
                raise Cancelled(f"deployment {spec.deployment_id} stopped before it started")
            port = spec.port if attempt == 1 and spec.port else free_port()
            proc, offset, how = self._start(spec, bundle, port, attempt, log)
            log(f"started scoring process {proc.pid} for {spec.model} v{spec.version} on {HOST}:{port} ({how})")
            started = time.monotonic()
            try:
                self._wait_healthy(spec, proc, port, offset, cancel)
            except _PortTaken:
                self._kill_started(proc)  # gunicorn would keep retrying the bind for seconds
                if attempt == 2:
                    raise DeployError(f"port {port} was taken twice while starting {spec.deployment_id}; "
                                      "too many services are starting at once, retry") from None
                log(f"port {port} was taken meanwhile; retrying on another port")
                continue
            except BaseException:
                self._kill_started(proc)
                self.pid_path(spec.deployment_id).unlink(missing_ok=True)
                raise
            url = f"http://{HOST}:{port}"
            log(f"healthy after {time.monotonic() - started:.2f}s at {url}")
            return RunningDeployment(deployment_id=spec.deployment_id, target=self.name, url=url,
                                     pid=proc.pid, port=port, log_path=self.log_path(spec.deployment_id))
        raise AssertionError("unreachable")  # pragma: no cover

    def is_alive(self, rd: RunningDeployment) -> bool:
        """See ``Target.is_alive``."""
        return self._identify(rd.pid, rd.deployment_id) is not None and probe(rd.port) is not None

    def exited(self, record: Deployment) -> bool:
        """See ``Target.exited``: the recorded pid no longer runs this deployment."""
        return bool(record.pid) and self._identify(record.pid or 0, record.id) is None

    def adopt(self, record: Deployment) -> RunningDeployment | None:
        """See ``Target.adopt``: pid alive, started for this deployment, running this bundle on
        this port, and ``/healthz`` names the recorded model and version."""
        if record.target != self.name or not record.pid or not record.port or not record.bundle:
            return None
        proc = self._identify(record.pid, record.id)
        if proc is None or not _runs(proc, Path(record.bundle).resolve(), record.port):
            return None
        health = probe(record.port)
        if health is None or not _same_version(health, record.model, record.version):
            return None
        return RunningDeployment(deployment_id=record.id, target=self.name, url=f"http://{HOST}:{record.port}",
                                 pid=record.pid, port=record.port, log_path=self.log_path(record.id))

    def pid_path(self, deployment_id: str) -> Path:
        """Where the pid of the deployment's process is kept from the moment it starts."""
        return self.home / "deployments" / f"{deployment_id}.pid"

    def delete(self, rd: RunningDeployment) -> None:
        """See ``Target.delete``: SIGTERM to the process group, SIGKILL after ``grace_s``. A
        deployment whose pid was never recorded (the control plane died while it started) is
        found by its pid file."""
        pid = rd.pid or _read_pid(self.pid_path(rd.deployment_id))
        proc = self._identify(pid, rd.deployment_id)
        if proc is None:
            self._reap(pid)
            self.pid_path(rd.deployment_id).unlink(missing_ok=True)
            return
        alive = self._stop(pid, _family(proc))
        if alive:
            raise DeployError(f"deployment {rd.deployment_id}: processes {[p.pid for p in alive]} "
                              "survived SIGKILL")
        self.pid_path(rd.deployment_id).unlink(missing_ok=True)

    def logs(self, rd: RunningDeployment, tail: int = 200) -> str:
        """See ``Target.logs``."""
        return tail_lines(rd.log_path, tail)

    # -- steps ---------------------------------------------------------------------------

    def _start(self, spec: DeploySpec, bundle: Path, port: int, attempt: int, log: Log) -> tuple[Started, int, str]:
        """Start the scoring process (forked from its environment's parent when warm starts are
        on and one can fork it, else a fresh interpreter); return it, where its output starts in
        the log and how it started."""
        log_path = self.log_path(spec.deployment_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # absolute, not resolved: resolving the venv's python symlink would leave the venv
        argv = [os.path.abspath(spec.bundle.python), "-m", "modelcd.scoring", "--model-dir", str(bundle / "model"),
                "--config", str(bundle / "scoring.json"), "--host", HOST, "--port", str(port),
                "--workers", str(spec.workers)]
        env = _scoring_env(spec, bundle)
        with open(log_path, "ab") as out:
            out.write(f"--- modelcd: starting {spec.deployment_id} ({spec.model} v{spec.version}) "
                      f"on {HOST}:{port}, attempt {attempt}\n".encode())
            out.flush()
            offset = out.tell()
            forked = self._fork(bundle, argv, env, log_path)
            if isinstance(forked, Started):
                started, how = forked, "warm"
            else:
                if forked is not None:  # say why, in the job's log and the deployment's
                    log(f"warm start unavailable ({forked}); starting a fresh interpreter")
                    out.write(f"--- modelcd: warm start unavailable ({forked}); cold start\n".encode())
                    out.flush()
                    offset = out.tell()
                started, how = self._exec(argv, bundle, env, out), "cold"
        # the pid is recorded in the store only once healthy: a crash before that finds it here
        _write_pid(self.pid_path(spec.deployment_id), started.pid)
        return started, offset, how

    def _fork(self, bundle: Path, argv: list[str], env: dict[str, str], log_path: Path) -> Started | str | None:
        """A deployment forked from its environment's parent; why not (warm starts on but no
        parent can fork it); None when warm starts are off."""
        if self.warm is None:
            return None
        request = {"argv": argv[3:], "title": argv, "env": env, "cwd": str(bundle), "log": str(log_path),
                   "runtime": str(bundle / "runtime")}
        try:
            pid, key = self.warm.fork(argv[0], bundle, inherited_env(os.environ), request)
        except WarmUnavailable as e:
            return str(e)
        return Started(pid, warm=(self.warm, key))

    def _exec(self, argv: list[str], bundle: Path, env: dict[str, str], out: Any) -> Started:
        """A fresh interpreter in its own session, output appended to ``out``."""
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=bundle, env=env, start_new_session=True, close_fds=True)
        except OSError as e:
            raise DeployError(f"cannot start {argv[0]}: {e.strerror}; rebuild the bundle") from e
        with self._lock:
            self._children[proc.pid] = proc
        return Started(proc.pid, popen=proc)

    def _wait_healthy(self, spec: DeploySpec, proc: Started, port: int, offset: int,
                      cancel: threading.Event) -> None:
        """Return once the process answers /healthz for the spec's model and version; raise
        _PortTaken as soon as its output says the port is taken."""
        deadline = time.monotonic() + spec.health_timeout_s
        output = _LogReader(self.log_path(spec.deployment_id), offset)
        while True:
            if cancel.is_set():
                raise Cancelled(f"deployment {spec.deployment_id} stopped while starting")
            code = proc.poll()
            if _PORT_TAKEN.search(output.read()):
                raise _PortTaken()
            if code is not None:
                raise DeployError(f"scoring process of {spec.model} v{spec.version} exited with code "
                                  f"{code if code != -1 else '(unknown)'} "
                                  f"before it was healthy; last lines of {output.path}:\n{output.last(20)}")
            health = probe(port, timeout=1.0)
            if (health is not None and _same_version(health, spec.model, spec.version)
                    and _listens(_family(psutil.Process(proc.pid)), port)):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"scoring process of {spec.model} v{spec.version} was not healthy within "
                                  f"{spec.health_timeout_s:g}s; last lines of {output.path}:\n{output.last(20)}")
            time.sleep(_POLL_S)

    def _kill_started(self, proc: Started) -> None:
        """Stop a process create() started and is giving up on, without a grace period (an
        unreaped child, ours or its parent's: its pid and group id cannot be recycled yet)."""
        proc.kill()
        self._reap(proc.pid)

    def _stop(self, pid: int, procs: list[psutil.Process]) -> list[psutil.Process]:
        """SIGTERM the group of ``pid``, wait ``grace_s``, SIGKILL what is left; return survivors."""
        _signal_group(pid, procs, signal.SIGTERM)
        alive = self._wait_gone(procs, self.grace_s)
        if alive:
            _signal_group(pid, alive, signal.SIGKILL)
            alive = self._wait_gone(alive, 5.0)
        self._reap(pid)
        return alive

    def _wait_gone(self, procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        alive = procs
        while True:
            for p in alive:
                self._poll_child(p.pid)
            alive = [p for p in alive if _running(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.05)

    def _poll_child(self, pid: int) -> None:
        with self._lock:
            proc = self._children.get(pid)
        if proc is not None:
            proc.poll()

    def _reap(self, pid: int) -> None:
        """Collect the exit status of a child started here, forgetting it once it exited."""
        with self._lock:
            proc = self._children.get(pid)
            if proc is not None and proc.poll() is not None:
                del self._children[pid]

    def _identify(self, pid: int, deployment_id: str) -> psutil.Process | None:
        """The live process ``pid`` if it was started for ``deployment_id``, else None."""
        if pid <= 0:
            return None
        try:
            proc = psutil.Process(pid)
            self._poll_child(pid)
            if not _running(proc) or proc.environ().get(ID_ENV) != deployment_id:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


# -- helpers -------------------------------------------------------------------------------


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def probe(port: int, timeout: float = 2.0, host: str = HOST) -> dict[str, Any] | None:
    """``GET /healthz`` on ``host``:``port``: its JSON body when it answers 200, else None."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        data = json.loads(body or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def tail_lines(path: Path, n: int) -> str:
    """The last ``n`` lines of ``path`` ("" when missing), read from the end."""
    if n <= 0:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = pos = fh.tell()
            chunk = b""
            while pos > 0 and chunk.count(b"\n") <= n:
                pos = max(0, pos - 65536)
                fh.seek(pos)
                chunk = fh.read(end - pos)
    except FileNotFoundError:
        return ""
    text = chunk.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-n:])


def _check_bundle(spec: DeploySpec) -> Path:
    bundle = spec.bundle.path.resolve()
    for need in (bundle / "scoring.json", bundle / "model", bundle / "runtime", spec.bundle.python):
        if not need.exists():
            raise DeployError(f"bundle of {spec.model} v{spec.version} is incomplete: {need} is missing; "
                              "run the build stage again")
    return bundle


def _scoring_env(spec: DeploySpec, bundle: Path) -> dict[str, str]:
    """The inherited basics, then the policy's variables, then the runtime's (which win)."""
    env = inherited_env(os.environ)
    env.update(spec.env)
    env.update(PYTHONPATH=str(bundle / "runtime"), PYTHONUNBUFFERED="1")
    env[ID_ENV] = spec.deployment_id
    if spec.scoring_key:
        env[KEY_ENV] = spec.scoring_key
    return env


def _same_version(health: dict[str, Any], model: str, version: int) -> bool:
    return health.get("model") == model and str(health.get("version")) == str(version)


def _runs(proc: psutil.Process, bundle: Path, port: int) -> bool:
    """Whether ``proc`` serves ``bundle`` on ``port`` (by command line, else cwd and sockets)."""
    try:
        cmd = proc.cmdline()
        by_bundle = any(str(bundle) in arg for arg in cmd) or Path(proc.cwd()) == bundle
        by_port = any(a == "--port" and b == str(port) for a, b in itertools.pairwise(cmd))
        return by_bundle and (by_port or _listens(_family(proc), port))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _family(proc: psutil.Process) -> list[psutil.Process]:
    """``proc`` and its descendants (scoring workers)."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [proc]


def _listens(procs: list[psutil.Process], port: int) -> bool:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
                    return True
    return False


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan nobody reaps still has a pid but serves nothing)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _signal_group(pid: int, procs: list[psutil.Process], sig: signal.Signals) -> None:
    """Signal the session's process group, and each given process in case it left it."""
    grouped = False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # Only while the leader lives: then ``pid`` is surely still this group's id.
        if any(p.pid == pid and _running(p) for p in procs) and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            grouped = True
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if not (grouped and os.getpgid(p.pid) == pid):
                p.send_signal(sig)


class _LogReader:
    """What one start of a scoring process wrote to its log, read as it grows."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self._pos = offset
        self._text = ""

    def read(self) -> str:
        """Everything written since the start (bounded to the last 256 KiB)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except FileNotFoundError:
            return self._text
        self._pos += len(data)
        self._text = (self._text + data.decode("utf-8", errors="replace"))[-262144:]
        return self._text

    def last(self, n: int) -> str:
        """The last ``n`` non-empty lines, or a note that there were none."""
        lines = [ln for ln in self.read().splitlines() if ln.strip()]
        return "\n".join(lines[-n:]) if lines else "(no output)"
