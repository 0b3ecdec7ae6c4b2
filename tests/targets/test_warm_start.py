"""Warm starts of the process target: deployments forked from their environment's parent
process, against real parents, real scoring processes and fresh interpreters side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import joblib
import psutil
import pytest
import requests
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier

from modelcd.builders.bundle import build_bundle
from modelcd.domain import Bundle, Flavor
from modelcd.targets.base import DeploySpec, RunningDeployment
from modelcd.targets.process import ProcessTarget, inherited_env
from modelcd.targets.warm import WarmStarts

from .conftest import SAMPLE, _version, gone, scoring_processes
from .test_process import record_of

ROWS = load_iris(return_X_y=True)[0][::3].tolist()  # 50 rows
PROBE_SCRIPT = """import os, random, signal
import numpy as np
from threadpoolctl import threadpool_info


def init():
    pass


def run(raw_data):
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return {"pid": os.getpid(), "ppid": os.getppid(), "random": random.random(), "np": float(np.random.random()),
            "threads": sorted([i["internal_api"], i["num_threads"]] for i in threadpool_info()),
            "omp": os.environ.get("OMP_NUM_THREADS"), "fds": fds,
            "signals": [_name(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE)]}


def _name(handler):
    return getattr(handler, "__qualname__", str(handler))
"""
PROBA_SCRIPT = """import json
import os
import joblib

MODEL = None


def init():
    global MODEL
    MODEL = joblib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "forest.joblib"))


def run(raw_data):
    return [float(p).hex() for p in MODEL.predict_proba(json.loads(raw_data)["data"]).ravel()]
"""


def _bundle(home: Path, files: Path, model: str, version: int, **changes: Any) -> Bundle:
    return build_bundle(home, replace(_version(model, version), **changes), files, lambda _: None, threading.Event())


@pytest.fixture(scope="module")
def tree_bundle(shared_home: Path, iris_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Version 1 of ``flowers``: another model (a depth-1 tree: answers 0 or 1 only), same environment as iris."""
    files = tmp_path_factory.mktemp("tree-files")
    x, y = load_iris(return_X_y=True)
    joblib.dump(DecisionTreeClassifier(max_depth=1).fit(x, y == 0), files / "model.joblib")
    return _bundle(shared_home, files, "flowers", 1)


@pytest.fixture(scope="module")
def probe_bundle(shared_home: Path, iris_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Version 1 of ``probe``: a custom model that answers what its worker process looks like."""
    files = tmp_path_factory.mktemp("probe-files")
    (files / "score.py").write_text(PROBE_SCRIPT)
    return _bundle(shared_home, files, "probe", 1, flavor=Flavor.CUSTOM, model_file=None, entry_script="score.py",
                   sample=None)


@pytest.fixture(scope="module")
def proba_bundle(shared_home: Path, iris_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Version 1 of ``proba``: a random forest's predict_proba as exact float hex strings."""
    files = tmp_path_factory.mktemp("proba-files")
    x, y = load_iris(return_X_y=True)
    joblib.dump(RandomForestClassifier(n_estimators=30, random_state=3).fit(x, y), files / "forest.joblib")
    (files / "score.py").write_text(PROBA_SCRIPT)
    return _bundle(shared_home, files, "proba", 1, flavor=Flavor.CUSTOM, model_file=None, entry_script="score.py",
                   sample=None)


@pytest.fixture
def parent(target: ProcessTarget, iris_bundle: Bundle) -> dict[str, Any]:
    """The hello of the running parent of the iris environment (started when none runs)."""
    assert target.warm is not None
    return target.warm.ensure(str(iris_bundle.python.absolute()), iris_bundle.path, inherited_env(os.environ))


@pytest.fixture
def cold(shared_home: Path) -> ProcessTarget:
    return ProcessTarget(shared_home, grace_s=5.0, warm_starts=False)


@pytest.fixture
def deploy(target: ProcessTarget) -> Iterator[Callable[..., tuple[RunningDeployment, list[str]]]]:
    """create() on ``target`` (or another), returning the deployment and its log lines; deletes them after."""
    made: list[tuple[ProcessTarget, RunningDeployment]] = []

    def make(bundle: Bundle, model: str, on: ProcessTarget | None = None, **kw: Any) -> tuple[RunningDeployment,
                                                                                              list[str]]:
        t = on or target
        spec = DeploySpec(deployment_id=f"w-{os.urandom(5).hex()}", model=model, version=1, environment="staging",
                          bundle=bundle, **{"workers": 1, **kw})
        lines: list[str] = []
        rd = t.create(spec, lines.append, threading.Event())
        made.append((t, rd))
        return rd, lines

    yield make
    for t, rd in made:
        t.delete(rd)


def _score(rd: RunningDeployment, body: Any) -> Any:
    r = requests.post(f"{rd.url}/score", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _warm(lines: list[str]) -> bool:
    return any(line.startswith("started scoring process") and line.endswith("(warm)") for line in lines)


def test_deployments_of_different_models_fork_from_one_parent_and_die_alone(
        target: ProcessTarget, parent: dict[str, Any], deploy: Callable[..., Any], iris_bundle: Bundle,
        tree_bundle: Bundle) -> None:
    (iris, iris_lines), (tree, tree_lines) = deploy(iris_bundle, "iris", workers=2), deploy(tree_bundle, "flowers")
    assert _warm(iris_lines) and _warm(tree_lines), (iris_lines, tree_lines)
    for rd, model in ((iris, "iris"), (tree, "flowers")):
        proc = psutil.Process(rd.pid)
        assert proc.ppid() == parent["pid"] and os.getpgid(rd.pid) == rd.pid  # a child, in its own group
        assert proc.environ()["MODELCD_DEPLOYMENT_ID"] == rd.deployment_id and proc.cmdline()[1:3] == ["-m",
                                                                                                     "modelcd.scoring"]
        assert requests.get(f"{rd.url}/healthz", timeout=5).json()["model"] == model
        assert "modelcd-scoring listening" in target.logs(rd)
    # healthy once one worker answers: the second may still be forking
    deadline = time.monotonic() + 10
    while len(psutil.Process(iris.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(psutil.Process(iris.pid).children()) == 2 and len(psutil.Process(tree.pid).children()) == 1
    assert _score(iris, {"data": SAMPLE})["predictions"] == [0, 2]
    assert _score(tree, {"data": SAMPLE})["predictions"] == [True, False]
    metrics = requests.get(f"{iris.url}/metrics", timeout=5).text
    assert 'route="score"' in metrics and 'model="iris"' in metrics

    os.killpg(tree.pid, signal.SIGKILL)  # a crash of one deployment, workers included
    deadline = time.monotonic() + 10
    while (scoring_processes(target.home, tree.deployment_id) or not gone(tree)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(tree) and not target.is_alive(tree) and target.exited(record_of(tree, _spec_of(tree, tree_bundle)))
    assert _score(iris, {"data": SAMPLE})["predictions"] == [0, 2] and target.is_alive(iris)
    assert psutil.Process(parent["pid"]).is_running()


def test_deployments_outlive_their_parent_and_the_next_start_is_cold_then_warm_again(
        target: ProcessTarget, parent: dict[str, Any], deploy: Callable[..., Any], iris_bundle: Bundle,
        tree_bundle: Bundle) -> None:
    iris, _ = deploy(iris_bundle, "iris")
    os.kill(parent["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(parent["pid"]) and psutil.Process(parent["pid"]).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert _score(iris, {"data": SAMPLE})["predictions"] == [0, 2] and target.is_alive(iris)
    assert psutil.Process(iris.pid).ppid() != parent["pid"]  # reparented

    tree, lines = deploy(tree_bundle, "flowers")  # no parent answers: a cold start, said so, and a new parent
    assert any("warm start unavailable (no parent process" in line for line in lines), lines
    assert "warm start unavailable" in target.logs(tree) and not _warm(lines)
    assert _score(tree, {"data": SAMPLE})["predictions"] == [True, False]
    assert target.warm is not None
    again = target.warm.ensure(str(iris_bundle.python.absolute()), iris_bundle.path, inherited_env(os.environ))
    assert again["pid"] != parent["pid"]
    third, lines = deploy(iris_bundle, "iris")
    assert _warm(lines) and psutil.Process(third.pid).ppid() == again["pid"]


def test_forked_deployments_are_adopted_after_the_control_plane_dies(
        target: ProcessTarget, parent: dict[str, Any], iris_bundle: Bundle, tree_bundle: Bundle,
        shared_home: Path) -> None:
    script = """
import json, sys, threading
from pathlib import Path
from modelcd.domain import Bundle
from modelcd.targets.base import DeploySpec
from modelcd.targets.process import ProcessTarget
a = json.loads(sys.argv[1])
target, out = ProcessTarget(Path(a["home"])), []
for d in a["deployments"]:
    bundle = Bundle(path=Path(d["bundle"]), python=Path(d["python"]), env_key=d["env_key"], reused_env=True)
    spec = DeploySpec(deployment_id=d["id"], model=d["model"], version=1, environment="staging", bundle=bundle,
                      workers=1)
    lines = []
    rd = target.create(spec, lines.append, threading.Event())
    out.append({"pid": rd.pid, "port": rd.port, "url": rd.url, "lines": lines})
print(json.dumps(out), flush=True)
threading.Event().wait()
"""
    specs = [DeploySpec(deployment_id=f"w-{os.urandom(5).hex()}", model=model, version=1, environment="staging",
                        bundle=bundle, workers=1)
             for bundle, model in ((iris_bundle, "iris"), (tree_bundle, "flowers"))]
    args = {"home": str(shared_home), "deployments": [
        {"bundle": str(s.bundle.path), "python": str(s.bundle.python), "env_key": s.bundle.env_key,
         "id": s.deployment_id, "model": s.model} for s in specs]}
    with subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], stdout=subprocess.PIPE,
                          text=True) as launcher:  # the control plane, killed once it started them
        try:
            started = json.loads(launcher.stdout.readline()) if launcher.stdout else []
        finally:
            launcher.kill()
    handles = [RunningDeployment(s.deployment_id, "process", d["url"], d["pid"], d["port"],
                                 target.log_path(s.deployment_id)) for s, d in zip(specs, started, strict=True)]
    try:
        assert all(_warm(d["lines"]) for d in started), started
        restarted = ProcessTarget(shared_home)  # a new control plane
        for rd, spec in zip(handles, specs, strict=True):
            assert psutil.Process(rd.pid).ppid() == parent["pid"]
            assert restarted.adopt(record_of(rd, spec)) == rd and restarted.is_alive(rd)
        assert _score(handles[0], {"data": SAMPLE})["predictions"] == [0, 2]
        assert _score(handles[1], {"data": SAMPLE})["predictions"] == [True, False]
    finally:
        for rd in handles:
            target.delete(rd)
    assert all(gone(rd) for rd in handles)
    assert all(target.adopt(record_of(rd, spec)) is None for rd, spec in zip(handles, specs, strict=True))


def test_predict_proba_is_bit_for_bit_that_of_a_fresh_interpreter(
        parent: dict[str, Any], cold: ProcessTarget, deploy: Callable[..., Any], proba_bundle: Bundle) -> None:
    (warm, warm_lines), (fresh, fresh_lines) = deploy(proba_bundle, "proba"), deploy(proba_bundle, "proba", on=cold)
    assert _warm(warm_lines) and fresh_lines[0].endswith("(cold)"), (warm_lines, fresh_lines)
    got = _score(warm, {"data": ROWS})
    assert len(got) == 150 and len(set(got)) > 3
    assert got == _score(fresh, {"data": ROWS})


def _answers(rd: RunningDeployment, workers: int) -> dict[int, dict[str, Any]]:
    """One probe answer per worker process (new connections until each answered)."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(200):
        answer = _score(rd, {})
        seen.setdefault(answer["pid"], answer)
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} of {rd.deployment_id} answered")


def _threads(answer: dict[str, Any]) -> dict[str, set[int]]:
    """Thread counts by native library kind in a probe's answer."""
    out: dict[str, set[int]] = {}
    for api, n in answer["threads"]:
        out.setdefault(api, set()).add(n)
    return out


def _signals(pid: int) -> dict[str, str]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_after_fork_threads_seeds_files_and_signals_are_those_of_a_fresh_interpreter(
        parent: dict[str, Any], cold: ProcessTarget, deploy: Callable[..., Any], probe_bundle: Bundle,
        shared_home: Path) -> None:
    (a, a_lines), (b, b_lines) = deploy(probe_bundle, "probe", workers=2), deploy(probe_bundle, "probe")
    two, two_lines = deploy(probe_bundle, "probe", env={"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"})
    fresh, _ = deploy(probe_bundle, "probe", on=cold, workers=2)
    fresh_two, _ = deploy(probe_bundle, "probe", on=cold, env={"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"})
    assert _warm(a_lines) and _warm(b_lines) and _warm(two_lines)
    warm_answers = [*_answers(a, 2).values(), *_answers(b, 1).values()]
    fresh_answers = list(_answers(fresh, 2).values())
    # random generators: every worker of every deployment draws its own numbers
    assert len({x["random"] for x in warm_answers}) == 3 and len({x["np"] for x in warm_answers}) == 3
    # thread pools: one thread each by default, the policy's numbers when it sets them, as in a fresh interpreter
    # (a parent has imported more native libraries than the probe does: scipy's OpenBLAS, OpenMP)
    assert all(_threads(x) == {"openblas": {1}, "openmp": {1}} for x in warm_answers)
    assert _threads(fresh_answers[0]) == {"openblas": {1}}
    two_answer, fresh_two_answer = _score(two, {}), _score(fresh_two, {})
    assert _threads(two_answer) == {"openblas": {2}, "openmp": {2}} and two_answer["omp"] == "2"
    assert _threads(fresh_two_answer) == {"openblas": {2}}
    # files: nothing of the parent's is open in a deployment (its socket, its log)
    parent_fds = {os.readlink(f"/proc/{parent['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{parent['pid']}/fd")}
    parent_sockets = {t for t in parent_fds if t.startswith("socket:")}
    for x in warm_answers:
        assert not parent_sockets & set(x["fds"].values()), x["fds"]
        assert not any("zygotes" in t for t in x["fds"].values()), x["fds"]
        assert len(x["fds"]) == len(fresh_answers[0]["fds"]), (x["fds"], fresh_answers[0]["fds"])
        assert x["signals"] == fresh_answers[0]["signals"]
    for pid in (a.pid, b.pid):
        assert not any("zygotes" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    # signals: dispositions and mask of the arbiter and of a worker as in a fresh interpreter
    assert _signals(a.pid) == _signals(fresh.pid)
    assert _signals(psutil.Process(a.pid).children()[0].pid) == _signals(psutil.Process(fresh.pid).children()[0].pid)


def test_a_policy_setting_read_at_interpreter_start_falls_back_to_a_cold_start(
        target: ProcessTarget, parent: dict[str, Any], deploy: Callable[..., Any], iris_bundle: Bundle) -> None:
    rd, lines = deploy(iris_bundle, "iris", env={"PYTHONHASHSEED": "7"})
    assert any("warm start unavailable" in line and "PYTHONHASHSEED" in line for line in lines), lines
    assert lines[-2].startswith("started scoring process") and lines[-2].endswith("(cold)")
    assert psutil.Process(rd.pid).ppid() != parent["pid"]
    assert _score(rd, {"data": SAMPLE})["predictions"] == [0, 2]


def test_stop_all_stops_the_parents_but_not_their_deployments(
        target: ProcessTarget, parent: dict[str, Any], deploy: Callable[..., Any], iris_bundle: Bundle,
        shared_home: Path) -> None:
    rd, _ = deploy(iris_bundle, "iris")
    assert parent["pid"] in WarmStarts(shared_home).stop_all()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(parent["pid"]) and psutil.Process(parent["pid"]).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not list((shared_home / "zygotes").glob("*.sock"))
    assert _score(rd, {"data": SAMPLE})["predictions"] == [0, 2]


def _spec_of(rd: RunningDeployment, bundle: Bundle) -> DeploySpec:
    return DeploySpec(deployment_id=rd.deployment_id, model="flowers", version=1, environment="staging", bundle=bundle)


def test_a_batch_worker_is_forked_on_the_pipes_passed_to_the_parent(target: ProcessTarget, parent: dict[str, Any],
                                                                    iris_bundle: Bundle) -> None:
    """The batch scoring worker forked from the parent talks over the three descriptors sent
    with the request: its hello, a float matrix scored as the model itself scores it, a clean
    exit at the end of its input; a stdio request without them, or for another module, is refused."""
    import numpy as np

    from modelcd.scoring.batch import read_frame, write_frame
    from modelcd.targets.warm import WarmUnavailable

    assert target.warm is not None
    python, bundle = str(iris_bundle.python.absolute()), iris_bundle.path
    argv = [python, "-m", "modelcd.scoring.batch", "--model-dir", str(bundle / "model"), "--config",
            str(bundle / "scoring.json")]
    env = {**inherited_env(os.environ), "PYTHONPATH": str(bundle / "runtime"), "PYTHONUNBUFFERED": "1"}
    request = {"module": "modelcd.scoring.batch", "stdio": True, "argv": argv[3:], "title": argv, "env": env,
               "cwd": str(bundle), "runtime": str(bundle / "runtime")}
    with pytest.raises(WarmUnavailable, match="'stdio' needs 3 file descriptors"):
        target.warm.fork(python, bundle, inherited_env(os.environ), request)
    with pytest.raises(WarmUnavailable, match="'module' must be one of"):
        target.warm.fork(python, bundle, inherited_env(os.environ), {**request, "module": "os"})

    pipes = [os.pipe() for _ in range(3)]
    pid, key = target.warm.fork(python, bundle, inherited_env(os.environ), request,
                                fds=[pipes[0][0], pipes[1][1], pipes[2][1]])
    for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
        os.close(fd)
    with os.fdopen(pipes[0][1], "wb") as stdin, os.fdopen(pipes[1][0], "rb") as stdout, \
            os.fdopen(pipes[2][0], "rb") as stderr:
        proc = psutil.Process(pid)
        assert proc.ppid() == parent["pid"] and os.getpgid(pid) == pid
        assert proc.cmdline()[1:3] == ["-m", "modelcd.scoring.batch"]
        hello, _ = read_frame(stdout)
        assert hello is not None and hello["ok"] and hello["fast"] and hello["flavor"] == "sklearn", hello
        rows = np.ascontiguousarray(np.array(ROWS, dtype="float64"))
        write_frame(stdin, {"encoding": "f8", "shape": list(rows.shape), "limit": None}, memoryview(rows).cast("B"))
        answer, payload = read_frame(stdout)
        assert answer is not None and answer["ok"], answer
        got = np.frombuffer(payload, dtype=np.dtype(answer["encoding"])).reshape(answer["shape"])
        model = joblib.load(bundle / "model" / "model.joblib")
        assert got.tolist() == model.predict(rows).tolist()
        stdin.write(b"\x00\x00\x00\x00")
        stdin.flush()
        assert stdout.read() == b""  # its end of the pipe closed: it exited
        deadline = time.monotonic() + 10
        while target.warm.exit_code(key, pid) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert target.warm.exit_code(key, pid) == 0, stderr.read().decode(errors="replace")
