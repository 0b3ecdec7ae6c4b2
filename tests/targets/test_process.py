"""The process target against real scoring processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import requests

from modelcd.config import load_settings
from modelcd.domain import Bundle, Deployment, DeploymentState
from modelcd.errors import Cancelled, ConfigError, DeployError
from modelcd.targets import DockerTarget, get_target
from modelcd.targets import process as process_mod
from modelcd.targets.base import DeploySpec, RunningDeployment
from modelcd.targets.process import KEY_ENV, ProcessTarget, tail_lines

from .conftest import SAMPLE, gone, scoring_processes

Spec = Callable[..., DeploySpec]


def record_of(rd: RunningDeployment, spec: DeploySpec, **changes: object) -> Deployment:
    """What the control plane would have recorded for ``rd``."""
    rec = Deployment(id=rd.deployment_id, model=spec.model, version=spec.version, environment=spec.environment,
                     target="process", state=DeploymentState.READY, url=rd.url, pid=rd.pid, port=rd.port,
                     bundle=str(spec.bundle.path), release_id=None)
    return replace(rec, **changes)  # type: ignore[arg-type]


def port_is_free(port: int) -> bool:
    """A server could bind ``port`` now (TIME_WAIT leftovers of closed connections allowed)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


@pytest.fixture
def running(target: ProcessTarget, iris_bundle: Bundle, spec_for: Spec) -> Iterator[tuple[RunningDeployment,
                                                                                           DeploySpec]]:
    """One healthy deployment of iris v1, deleted afterwards."""
    spec = spec_for(iris_bundle)
    rd = target.create(spec, lambda _: None, threading.Event())
    yield rd, spec
    target.delete(rd)


# -- pure helpers ----------------------------------------------------------------------------


def test_get_target_by_name_and_unknown_names_list_the_known(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path}, environ={})
    assert isinstance(get_target("process", settings), ProcessTarget)
    assert isinstance(get_target("docker", settings), DockerTarget)  # connects lazily: no engine needed here
    with pytest.raises(ConfigError, match="unknown target 'kubernetes'; known targets: docker, process"):
        get_target("kubernetes", settings)


def test_tail_lines_reads_the_end_of_a_file(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail_lines(log, 2) == "line 99998\nline 99999"
    assert tail_lines(tmp_path / "missing.log", 5) == ""


def test_spec_repr_hides_the_scoring_key(iris_bundle: Bundle, spec_for: Spec) -> None:
    assert "s3cret" not in repr(spec_for(iris_bundle, scoring_key="s3cret"))


# -- real processes --------------------------------------------------------------------------


def test_create_score_delete(target: ProcessTarget, iris_bundle: Bundle, spec_for: Spec) -> None:
    spec = spec_for(iris_bundle, workers=2)
    lines: list[str] = []
    started = time.monotonic()
    rd = target.create(spec, lines.append, threading.Event())
    elapsed = time.monotonic() - started
    assert rd.url == f"http://127.0.0.1:{rd.port}" and rd.target == "process"
    assert any(line.startswith("healthy after") for line in lines), lines
    assert elapsed < spec.health_timeout_s
    health = requests.get(f"{rd.url}/healthz", timeout=5).json()
    assert health["status"] == "ok" and health["model"] == "iris" and str(health["version"]) == "1"
    scored = requests.post(f"{rd.url}/score", json={"data": SAMPLE}, timeout=10)
    assert scored.status_code == 200 and scored.json()["predictions"] == [0, 2]
    assert target.is_alive(rd)
    assert rd.log_path == target.log_path(spec.deployment_id) and "starting" in target.logs(rd)
    proc = psutil.Process(rd.pid)
    assert proc.cwd() == str(iris_bundle.path) and os.getpgid(rd.pid) == rd.pid  # own session
    assert proc.environ()["PYTHONPATH"] == str(iris_bundle.path / "runtime")
    assert KEY_ENV not in proc.environ()

    target.delete(rd)
    assert gone(rd) and port_is_free(rd.port) and not target.is_alive(rd)
    assert scoring_processes(target.home, spec.deployment_id) == []
    target.delete(rd)  # idempotent


def test_scoring_key_reaches_only_its_process(target: ProcessTarget, iris_bundle: Bundle, spec_for: Spec,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCD_TOKEN", "control-plane-secret")
    rd = target.create(spec_for(iris_bundle, scoring_key="k-123"), lambda _: None, threading.Event())
    try:
        env = psutil.Process(rd.pid).environ()
        assert env[KEY_ENV] == "k-123" and "MODELCD_TOKEN" not in env
        assert requests.post(f"{rd.url}/score", json={"data": SAMPLE}, timeout=10).status_code == 401
        ok = requests.post(f"{rd.url}/score", json={"data": SAMPLE}, headers={"Authorization": "Bearer k-123"},
                           timeout=10)
        assert ok.status_code == 200
    finally:
        target.delete(rd)


def test_scoring_process_sees_allowed_policy_and_runtime_env_but_no_secrets(
        target: ProcessTarget, env_bundle: Bundle, spec_for: Spec, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"GITHUB_TOKEN": "ghp-test-secret-1", "AWS_SECRET_ACCESS_KEY": "aws-test-secret-2",
               "MODELCD_API_TOKEN": "modelcd-test-secret-3"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a numeric library's knob: inherited
    spec = spec_for(env_bundle, version=7, env={"FEATURE_STORE_URL": "http://127.0.0.1:9/features"},
                    health_timeout_s=30.0)
    rd = target.create(spec, lambda _: None, threading.Event())
    try:
        answer = requests.post(f"{rd.url}/score", data="{}", timeout=10)
        arbiter_env = psutil.Process(rd.pid).environ()
    finally:
        target.delete(rd)
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    for env in (seen, arbiter_env):  # what the model's code reads, and what the process started with
        assert not set(secrets) & set(env)
        assert not any(value in answer.text for value in secrets.values())
        assert env["FEATURE_STORE_URL"] == "http://127.0.0.1:9/features"
        assert env["PATH"] == os.environ["PATH"] and env["OMP_NUM_THREADS"] == "3"
        assert env["MODELCD_DEPLOYMENT_ID"] == spec.deployment_id
    assert set(arbiter_env) <= {*process_mod.inherited_env(os.environ), *spec.env, "PYTHONPATH", "PYTHONUNBUFFERED",
                                "MODELCD_DEPLOYMENT_ID"}


def test_inherited_env_is_an_allow_list() -> None:
    environ = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC",
               "TMPDIR": "/tmp", "OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1048576",
               "OMP_NUM_THREADS": "2", "MKL_CBWR": "AUTO", "NVPL_BLAS_DEBUG_CPU_TYPE": "1",
               "GITHUB_TOKEN": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_ACCESS_KEY_ID": "x", "MODELCD_TOKEN": "x",
               "AZURE_CLIENT_SECRET": "x", "HTTPS_PROXY": "http://user:pass@proxy:3128", "PYTHONPATH": "/src",
               "PYTHONHOME": "/py", "VIRTUAL_ENV": "/venv", "SSH_AUTH_SOCK": "/tmp/agent"}
    kept = process_mod.inherited_env(environ)
    assert set(kept) == {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                         "OMP_NUM_THREADS", "MKL_CBWR", "NVPL_BLAS_DEBUG_CPU_TYPE"}
    assert all(kept[k] == environ[k] for k in kept)


def test_model_that_fails_to_load_raises_with_the_log_excerpt(target: ProcessTarget, broken_bundle: Bundle,
                                                              spec_for: Spec) -> None:
    spec = spec_for(broken_bundle, version=9)
    with pytest.raises(DeployError) as err:
        target.create(spec, lambda _: None, threading.Event())
    assert "modelcd_missing_module_xyz" in err.value.message
    assert "before it was healthy" in err.value.message
    assert scoring_processes(target.home, spec.deployment_id) == []


def test_health_timeout_stops_the_process(target: ProcessTarget, slow_bundle: Bundle, spec_for: Spec) -> None:
    # A model that is slow to load: a fast one can answer the first probe, which may outlast 0.2 s.
    spec = spec_for(slow_bundle, version=8, health_timeout_s=0.2)
    with pytest.raises(DeployError, match="not healthy within 0.2s"):
        target.create(spec, lambda _: None, threading.Event())
    assert scoring_processes(target.home, spec.deployment_id) == []


def test_cancel_while_starting_stops_the_process(target: ProcessTarget, slow_bundle: Bundle,
                                                 spec_for: Spec) -> None:
    spec = spec_for(slow_bundle, version=8)
    cancel = threading.Event()

    def on_line(line: str) -> None:
        if line.startswith("started scoring process"):
            threading.Timer(0.3, cancel.set).start()

    with pytest.raises(Cancelled):
        target.create(spec, on_line, cancel)
    assert scoring_processes(target.home, spec.deployment_id) == []


def test_port_taken_meanwhile_is_retried_on_a_new_port(target: ProcessTarget, iris_bundle: Bundle,
                                                       spec_for: Spec, monkeypatch: pytest.MonkeyPatch) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    ports = iter([taken])
    real = process_mod.free_port
    monkeypatch.setattr(process_mod, "free_port", lambda: next(ports, None) or real())
    lines: list[str] = []
    try:
        rd = target.create(spec_for(iris_bundle), lines.append, threading.Event())
    finally:
        squatter.close()
    try:
        assert rd.port != taken and any(f"port {taken} was taken" in line for line in lines), lines
        assert target.is_alive(rd)
    finally:
        target.delete(rd)


def test_adopt_after_the_launcher_is_killed(target: ProcessTarget, iris_bundle: Bundle, spec_for: Spec,
                                            shared_home: Path) -> None:
    spec = spec_for(iris_bundle)
    script = """
import json, sys, threading
from pathlib import Path
from modelcd.domain import Bundle
from modelcd.targets.base import DeploySpec
from modelcd.targets.process import ProcessTarget
a = json.loads(sys.argv[1])
bundle = Bundle(path=Path(a["bundle"]), python=Path(a["python"]), env_key=a["env_key"], reused_env=True)
spec = DeploySpec(deployment_id=a["id"], model="iris", version=1, environment="staging", bundle=bundle, workers=1)
rd = ProcessTarget(Path(a["home"])).create(spec, lambda _: None, threading.Event())
print(json.dumps({"pid": rd.pid, "port": rd.port, "url": rd.url}), flush=True)
threading.Event().wait()
"""
    args = {"bundle": str(iris_bundle.path), "python": str(iris_bundle.python), "env_key": iris_bundle.env_key,
            "id": spec.deployment_id, "home": str(shared_home)}
    launcher = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        started = json.loads(launcher.stdout.readline())
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert launcher.stdout is not None
        launcher.stdout.close()
    rd = RunningDeployment(spec.deployment_id, "process", started["url"], started["pid"], started["port"],
                           target.log_path(spec.deployment_id))
    try:
        assert psutil.Process(rd.pid).ppid() != launcher.pid  # orphaned, still serving
        adopted = target.adopt(record_of(rd, spec))
        assert adopted == rd
        assert target.is_alive(adopted)
        assert requests.post(f"{rd.url}/score", json={"data": SAMPLE}, timeout=10).json()["predictions"] == [0, 2]
    finally:
        target.delete(rd)
    assert gone(rd) and port_is_free(rd.port)
    assert target.adopt(record_of(rd, spec)) is None


def test_process_of_a_launcher_killed_while_starting_is_deleted_by_its_pid_file(
        target: ProcessTarget, iris_bundle: Bundle, spec_for: Spec, shared_home: Path) -> None:
    """The control plane dies between starting a scoring process and recording its pid (the
    store learns the pid only once healthy): delete() of the pid-less record still stops it."""
    spec = spec_for(iris_bundle)
    script = """
import json, sys, threading
from pathlib import Path
from modelcd.domain import Bundle
from modelcd.targets.base import DeploySpec
from modelcd.targets.process import ProcessTarget
a = json.loads(sys.argv[1])
bundle = Bundle(path=Path(a["bundle"]), python=Path(a["python"]), env_key=a["env_key"], reused_env=True)
spec = DeploySpec(deployment_id=a["id"], model="iris", version=1, environment="staging", bundle=bundle, workers=1)
ProcessTarget(Path(a["home"])).create(spec, lambda _: None, threading.Event())
"""
    args = {"bundle": str(iris_bundle.path), "python": str(iris_bundle.python), "env_key": iris_bundle.env_key,
            "id": spec.deployment_id, "home": str(shared_home)}
    pid_file = target.pid_path(spec.deployment_id)
    launcher = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.01)
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    orphan = int(pid_file.read_text())
    assert psutil.Process(orphan).environ()["MODELCD_DEPLOYMENT_ID"] == spec.deployment_id
    handle = RunningDeployment(spec.deployment_id, "process", "", 0, 0, target.log_path(spec.deployment_id))
    target.delete(handle)
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
    assert scoring_processes(target.home, spec.deployment_id) == [] and not pid_file.exists()
    target.delete(handle)  # idempotent


def test_adopt_refuses_what_is_not_the_recorded_deployment(target: ProcessTarget, running: tuple[
        RunningDeployment, DeploySpec], tmp_path: Path) -> None:
    rd, spec = running
    assert target.adopt(record_of(rd, spec)) == rd
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        refused = {
            "recycled pid (unrelated process)": record_of(rd, spec, pid=stranger.pid),
            "this test's own pid": record_of(rd, spec, pid=os.getpid()),
            "dead pid": record_of(rd, spec, pid=_dead_pid()),
            "other deployment id": record_of(rd, spec, id="d-someone-else"),
            "other version": record_of(rd, spec, version=2),
            "other model": record_of(rd, spec, model="wine"),
            "other port": record_of(rd, spec, port=rd.port + 1),
            "other bundle": record_of(rd, spec, bundle=str(tmp_path)),
            "other target": record_of(rd, spec, target="docker"),
            "nothing recorded": record_of(rd, spec, pid=None, port=None),
        }
        for why, rec in refused.items():
            assert target.adopt(rec) is None, why
        # delete() of a handle whose pid now belongs to someone else leaves that process alone
        target.delete(replace(rd, pid=stranger.pid))
        assert stranger.poll() is None
        assert target.is_alive(rd)
    finally:
        stranger.kill()
        stranger.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
