"""Fixtures for the process target: real bundles (the virtualenv is shared with tests/builders
through one session home) and a target that stops every deployment a test left running."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import joblib
import psutil
import pytest
import sklearn
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from modelcd.builders.bundle import build_bundle
from modelcd.domain import Bundle, Flavor, ModelVersion
from modelcd.targets.base import DeploySpec, RunningDeployment
from modelcd.targets.process import ID_ENV, ProcessTarget
from modelcd.targets.warm import PARENT_MODULE, WarmStarts

SAMPLE = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


class _Unloadable:
    """Pickles as a call into a module no environment has: loading it fails clearly."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (__import__, ("modelcd_missing_module_xyz",))


def _version(model: str, version: int) -> ModelVersion:
    return ModelVersion(model=model, version=version,
                        digest=hashlib.sha256(f"targets-{model}-{version}".encode()).hexdigest(),
                        flavor=Flavor.SKLEARN,
                        model_file="model.joblib", entry_script=None,
                        requirements=(f"scikit-learn=={sklearn.__version__}",), sample={"data": SAMPLE},
                        expected=None)


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One home per session (the same path tests/builders uses): envs are built once, and the
    warm-start parents of its environments stopped at the end."""
    home = tmp_path_factory.getbasetemp() / "modelcd-home"
    home.mkdir(exist_ok=True)
    yield home
    WarmStarts(home).stop_all()


@pytest.fixture(scope="session")
def iris_bundle(shared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A LogisticRegression on iris, built as version 1 of ``iris``."""
    files = tmp_path_factory.mktemp("iris-files")
    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), files / "model.joblib")
    return build_bundle(shared_home, _version("iris", 1), files, lambda _: None, threading.Event())


@pytest.fixture(scope="session")
def broken_bundle(shared_home: Path, iris_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Version 9 of ``iris``: same env, a model file that cannot load."""
    files = tmp_path_factory.mktemp("broken-files")
    (files / "model.joblib").write_bytes(pickle.dumps(_Unloadable()))
    return build_bundle(shared_home, _version("iris", 9), files, lambda _: None, threading.Event())


ENV_SCRIPT = """import os


def init():
    pass


def run(raw_data):
    return dict(os.environ)
"""

SLOW_SCRIPT = """import time


def init():
    time.sleep(60)  # never healthy within a test's timeout


def run(raw_data):
    return raw_data
"""


def _custom_bundle(home: Path, files: Path, version: int, script: str) -> Bundle:
    """Version ``version`` of ``iris`` as a custom model running ``script`` (same requirements
    as iris, so it reuses that env)."""
    (files / "score.py").write_text(script)
    custom = replace(_version("iris", version), flavor=Flavor.CUSTOM, model_file=None, entry_script="score.py",
                     sample=None)
    return build_bundle(home, custom, files, lambda _: None, threading.Event())


@pytest.fixture(scope="session")
def env_bundle(shared_home: Path, iris_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Version 7 of ``iris``: its ``run()`` answers with the scoring process's ``os.environ``."""
    return _custom_bundle(shared_home, tmp_path_factory.mktemp("env-files"), 7, ENV_SCRIPT)


@pytest.fixture(scope="session")
def slow_bundle(shared_home: Path, iris_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Version 8 of ``iris``: its ``init()`` takes a minute, so it is never healthy in time."""
    return _custom_bundle(shared_home, tmp_path_factory.mktemp("slow-files"), 8, SLOW_SCRIPT)


@pytest.fixture
def target(shared_home: Path) -> Iterator[ProcessTarget]:
    """A process target; whatever a test left running is deleted afterwards (the environments'
    warm-start parents stay for the next tests)."""
    t = ProcessTarget(shared_home, grace_s=5.0)
    yield t
    for proc in scoring_processes(shared_home):
        with _suppress():
            if PARENT_MODULE not in proc.cmdline():
                proc.kill()


@pytest.fixture
def spec_for() -> Callable[..., DeploySpec]:
    """A DeploySpec for ``bundle`` with a fresh deployment id."""

    def make(bundle: Bundle, version: int = 1, **kw: object) -> DeploySpec:
        values: dict[str, object] = {"workers": 1, "health_timeout_s": 60.0, **kw}
        return DeploySpec(deployment_id=f"d-{uuid.uuid4().hex[:10]}", model="iris", version=version,
                          environment="staging", bundle=bundle, **values)  # type: ignore[arg-type]

    return make


def scoring_processes(home: Path, deployment_id: str | None = None) -> list[psutil.Process]:
    """Live (non-zombie) scoring processes started from bundles under ``home``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with _suppress():
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not proc.info["cmdline"]:
                continue
            if not any(str(home) in arg for arg in proc.info["cmdline"]):
                continue
            if deployment_id is None or proc.environ().get(ID_ENV) == deployment_id:
                found.append(proc)
    return found


def gone(rd: RunningDeployment) -> bool:
    """The deployment's process no longer runs (a reparented zombie, or one being reaped, counts as gone)."""
    try:
        return psutil.Process(rd.pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)  # "X": being reaped
    except psutil.NoSuchProcess:
        return True


def _suppress() -> contextlib.suppress:
    return contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied)
