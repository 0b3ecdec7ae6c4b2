"""Fixtures for the build stage: a tiny iris model and one home shared by the session, so
the scikit-learn virtualenv is built once (tests/targets uses the same home and env)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import joblib
import pytest
import sklearn
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from modelcd.builders.bundle import build_bundle
from modelcd.domain import Bundle, Flavor, ModelVersion

SAMPLE = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
SKLEARN_REQ = f"scikit-learn=={sklearn.__version__}"


@dataclass
class Recorder:
    """A ``log`` callback that keeps the lines."""

    lines: list[str] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Built:
    bundle: Bundle
    seconds: float
    log: Recorder


def iris_version(files: Path, version: int = 1, **changes: Any) -> ModelVersion:
    """A sklearn version of model ``iris`` whose digest depends on its number."""
    base = ModelVersion(model="iris", version=version, digest=hashlib.sha256(f"iris-{version}".encode()).hexdigest(),
                        flavor=Flavor.SKLEARN, model_file="model.joblib", entry_script=None,
                        requirements=(SKLEARN_REQ,), sample={"data": SAMPLE}, expected=None)
    return replace(base, **changes)


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home per session (the same path tests/targets uses): envs are built once."""
    home = tmp_path_factory.getbasetemp() / "modelcd-home"
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture(scope="session")
def iris_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LogisticRegression trained on iris, joblib-dumped to ``model.joblib``."""
    folder = tmp_path_factory.mktemp("iris-files")
    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), folder / "model.joblib")
    return folder


@pytest.fixture(scope="session")
def built(shared_home: Path, iris_files: Path) -> Built:
    """Version 1 of iris, built (cold, unless tests/targets built it first)."""
    log = Recorder()
    started = time.monotonic()
    bundle = build_bundle(shared_home, iris_version(iris_files), iris_files, log, threading.Event())
    return Built(bundle, time.monotonic() - started, log)


@pytest.fixture
def build(iris_files: Path) -> Callable[..., Built]:
    """Build ``version`` into ``home`` and time it."""

    def run(home: Path, version: ModelVersion, files: Path | None = None,
            cancel: threading.Event | None = None, log: Recorder | None = None) -> Built:
        log = log or Recorder()
        started = time.monotonic()
        bundle = build_bundle(home, version, files or iris_files, log, cancel or threading.Event())
        return Built(bundle, time.monotonic() - started, log)

    return run
