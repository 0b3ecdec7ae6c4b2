"""Shared fixtures: a real `modelcd serve` on loopback with its own home and ports, and
small sklearn models trained on scikit-learn's bundled iris data."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
import requests

from modelcd.client import Client
from modelcd.config import load_settings
from modelcd.quickstart import make_model
from modelcd.targets.process import free_port

TOKEN = "test-token-0123456789abcdef"




def iris_model(folder: Path, c: float = 1.0, expected_offset: int = 0) -> dict[str, Any]:
    """The quickstart's LogisticRegression on iris in ``folder``; registration metadata,
    with the expected output shifted by ``expected_offset`` to make a mismatching version."""
    meta = make_model(folder, c)
    meta["expected"] = [int(p) + expected_offset for p in meta["expected"]]
    return meta


# an entry script answering each row of {"data": [[...], ...]} with the sum of its values
SUM_OF_ROWS = """\
def init():
    pass

def run(raw_data):
    import json
    return [sum(r) for r in json.loads(raw_data)["data"]]
"""


def custom_model(folder: Path, body: str) -> dict[str, Any]:
    """An Azure-ML style entry script model (score.py with init/run)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score.py").write_text(body)
    (folder / "requirements.txt").write_text("")
    return {"flavor": "custom", "sample": {"data": [[1.0, 2.0]]}}


@dataclass
class Service:
    """A `modelcd serve` subprocess with its own home and ports."""

    home: Path
    port: int
    router_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, env) → primary key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def settings(self) -> Any:
        return load_settings(environ=self.env)

    @property
    def client(self) -> Client:
        return Client(self.settings)

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.home / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve"], env=self.env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"modelcd serve exited:\n{log.read_text()}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"modelcd serve not ready:\n{log.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {"Authorization": f"Bearer {TOKEN}"})
        return requests.request(method, f"{self.url}/api/v1{path}", headers=headers, timeout=60, **kw)

    def apply_policy(self, text: str) -> None:
        """Store a release policy (YAML) through the API; it must be accepted."""
        r = self.api("PUT", "/policies", data=text, headers={"Authorization": f"Bearer {TOKEN}",
                                                             "Content-Type": "application/yaml"})
        assert r.status_code == 200, r.text

    def register(self, name: str, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        return self.client.register(name, folder, meta)

    def wait_release_for(self, name: str, version: int, timeout_s: float = 300) -> dict[str, Any]:
        rel = self.client.find_release(name, version)
        assert rel is not None, f"no release for {name} v{version}"
        return self.client.wait_release(rel["id"], timeout_s=timeout_s)

    def wait_failed_untouched(self, name: str, version: int, why: str) -> str:
        """Wait for the release of ``name`` v``version``; it must fail saying ``why`` (in its
        error or job log) and leave the endpoint's traffic as it was. Returns the job log."""
        before = self.endpoint(name)["traffic"]
        rel = self.wait_release_for(name, version)
        log = self.job_log(rel["id"])
        assert rel["phase"] == "failed", log
        assert why in (rel["error"] + log), (rel["error"], log)
        assert self.endpoint(name)["traffic"] == before
        return log

    def release_detail(self, release_id: str) -> dict[str, Any]:
        return self.api("GET", f"/releases/{release_id}").json()

    def job_log(self, release_id: str) -> str:
        lines = []
        for job in self.release_detail(release_id)["jobs"]:
            logs = self.api("GET", f"/jobs/{job['id']}/logs").json()["logs"]
            lines += [f"[{job['type']}] {entry['line']}" for entry in logs]
        return "\n".join(lines)

    def endpoint(self, name: str, env: str = "production") -> dict[str, Any]:
        return self.api("GET", f"/endpoints/{name}/{env}").json()

    def auth(self, endpoint: dict[str, Any]) -> dict[str, str]:
        """``Authorization`` with the primary key of ``endpoint`` (as ``endpoint()`` returns it):
        asked for once (a key is shown only when it is made), then kept."""
        where = (endpoint["model"], endpoint["environment"])
        if where not in self.keys:
            r = self.api("POST", f"/endpoints/{where[0]}/{where[1]}/keys", json={})
            assert r.status_code == 200, r.text
            if r.json()["primary"] is None:  # shown earlier, to someone else: make a new one
                r = self.api("POST", f"/endpoints/{where[0]}/{where[1]}/keys", json={"regenerate": "primary"})
            self.keys[where] = r.json()["primary"]
        return {"Authorization": f"Bearer {self.keys[where]}"}

    def shutdown_data_plane(self) -> None:
        from modelcd.lifecycle import stop_data_plane

        for _ in stop_data_plane(self.settings):
            pass


def make_service(tmp: Path, **extra_env: str) -> Service:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    port, router_port = free_port(), free_port()
    env.update({"MODELCD_HOME": str(tmp / "home"), "MODELCD_PORT": str(port), "MODELCD_ROUTER_PORT": str(router_port),
                "MODELCD_URL": f"http://127.0.0.1:{port}", "MODELCD_TOKEN": TOKEN, **extra_env})
    return Service(home=tmp / "home", port=port, router_port=router_port, env=env)


@contextlib.contextmanager
def running_service(tmp: Path, policy: str | None = None, **extra_env: str) -> Iterator[Service]:
    """A started service (with ``policy`` stored when given), stopped with its data plane after."""
    svc = make_service(tmp, **extra_env)
    svc.start()
    try:
        if policy is not None:
            svc.apply_policy(policy)
        yield svc
    finally:
        svc.stop()
        svc.shutdown_data_plane()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with running_service(tmp_path) as svc:
        yield svc


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("svc")) as svc:
        yield svc


def wait_until(predicate: Callable[[], Any], timeout_s: float = 120, poll_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g}s")


class Hammer:
    """A bounded concurrent client scoring through an endpoint URI until stopped."""

    def __init__(self, url: str, body: dict[str, Any] | list[dict[str, Any]], headers: dict[str, str] | None = None,
                 threads: int = 4, max_s: float = 120) -> None:
        # one body, or several sent in turn (each thread starts at its own offset)
        self.bodies = [json.dumps(b) for b in (body if isinstance(body, list) else [body])]
        self.url, self.body, self.max_s = url, self.bodies[0], max_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.ok = 0
        self.failures: list[str] = []
        self.failed_at: list[float] = []  # time.monotonic() of each failure
        self.versions: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.max_s
        turn = random.randrange(len(self.bodies))
        while not self._stop.is_set() and time.monotonic() < deadline:
            turn += 1
            try:
                r = session.post(self.url, data=self.bodies[turn % len(self.bodies)], headers=self.headers,
                                 timeout=10)
                with self._lock:
                    if r.status_code == 200:
                        self.ok += 1
                        v = r.headers.get("X-Modelcd-Version", "?")
                        self.versions[v] = self.versions.get(v, 0) + 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                        self.failed_at.append(time.monotonic())
            except requests.RequestException as e:
                with self._lock:
                    self.failures.append(repr(e))
                    self.failed_at.append(time.monotonic())

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


class Watcher:
    """Calls ``sample()`` every ``every_s`` on a thread while the ``with`` block runs (bounded:
    at most ``max_s``); subclasses record what they see."""

    every_s = 0.1
    max_s = 300.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sample()
            time.sleep(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
