"""Fixtures for the tests that need a real Docker engine (``scripts/docker-engine`` installs
and starts one where it can). Under ``CI=true`` a missing engine fails these tests; on a
developer's machine without one they skip with the reason.

One base image per session, built offline with ``modelcd base-image build`` (mmdebstrap |
docker import): that build is itself under test. Set MODELCD_TEST_REUSE_BASE_IMAGE=1 to
reuse an existing one while iterating locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelcd.builders.base_image import build_base_image
from modelcd.builders.image import ImageOptions
from modelcd.domain import Flavor, ModelVersion
from modelcd.quickstart import make_model
from modelcd.targets.docker import DockerTarget
from modelcd.targets.process import free_port

BASE_IMAGE = "modelcd-test/python:3.11-bookworm"


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """A client of a Docker engine that answers."""
    import docker

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as e:
        message = f"no Docker engine answers ({e}); run scripts/docker-engine (root, Debian) or start dockerd"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    before = {image.id for image in client.images.list(all=True)}
    yield client
    remove_new_images(client, before)
    client.close()


def remove_new_images(client: Any, before: set[str]) -> list[str]:
    """Remove the images this session made (tagged or not), all but the shared base image, so
    test runs do not fill the disk; images that were there before the session stay. Returns
    the ids removed. (Images another test session on the same engine made meanwhile look new
    too: run one session with Docker tests at a time per engine.)"""
    keep = set(before)
    with contextlib.suppress(Exception):
        keep.add(client.images.get(BASE_IMAGE).id)
    removed: list[str] = []
    for _ in range(3):  # children first: an image with dependent children goes on a later pass
        left = [image for image in client.images.list(all=True) if image.id not in keep and image.id not in removed]
        if not left:
            break
        for image in left:
            with contextlib.suppress(Exception):
                client.images.remove(image.id, force=True)
                removed.append(image.id)
    return removed


@pytest.fixture(autouse=True)
def _needs_engine(request: pytest.FixtureRequest) -> None:
    """Every test under tests/containers is marked `docker` and gets the engine check."""
    request.node.add_marker(pytest.mark.docker)
    request.getfixturevalue("engine")


@dataclass(frozen=True)
class BaseImage:
    tag: str
    image_id: str
    log: list[str]
    built: bool


@pytest.fixture(scope="session")
def base_image(engine: Any) -> BaseImage:
    """The offline Python base image, built once per session."""
    if os.environ.get("MODELCD_TEST_REUSE_BASE_IMAGE") == "1":
        with contextlib.suppress(Exception):
            return BaseImage(BASE_IMAGE, engine.images.get(BASE_IMAGE).id, [], built=False)
    lines: list[str] = []
    image_id = build_base_image(BASE_IMAGE, "bookworm", None, None, lines.append, threading.Event())
    return BaseImage(BASE_IMAGE, image_id, lines, built=True)


@pytest.fixture(scope="session")
def docker_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the build tests: the wheelhouse is filled once per session."""
    return tmp_path_factory.mktemp("docker-home")


@pytest.fixture(scope="session")
def image_options(base_image: BaseImage) -> ImageOptions:
    return ImageOptions(base_image=base_image.tag, repository="modelcd-test")


def iris_version(folder: Path, model: str, version: int, c: float = 1.0, **changes: Any) -> ModelVersion:
    """A LogisticRegression on iris written to ``folder``, described as ``model`` v``version``."""
    meta = make_model(folder, c)
    requirements = tuple((folder / "requirements.txt").read_text().split())
    digest = hashlib.sha256(f"{model}-{version}-{c}-{sorted(changes.items())}".encode()).hexdigest()
    fields: dict[str, Any] = {"model": model, "version": version, "digest": digest, "flavor": Flavor.SKLEARN,
                              "model_file": "model.joblib", "entry_script": None, "requirements": requirements,
                              "sample": meta["sample"], "expected": meta["expected"],
                              "description": meta["description"]}
    fields.update(changes)
    return ModelVersion(**fields)


def remove_containers(engine: Any, home: Path) -> list[str]:
    """Remove every container the control plane of ``home`` started; return their names."""
    instance = DockerTarget(home).instance
    names = []
    for container in engine.containers.list(all=True, filters={"label": f"io.modelcd.instance={instance}"}):
        names.append(container.name)
        with contextlib.suppress(Exception):
            container.remove(force=True)
    return names


def containers_of(engine: Any, home: Path) -> list[Any]:
    instance = DockerTarget(home).instance
    return engine.containers.list(all=True, filters={"label": f"io.modelcd.instance={instance}"})


@contextlib.contextmanager
def local_registry(root: Path) -> Iterator[tuple[str, str, str]]:
    """Debian's docker-registry on 127.0.0.1 with htpasswd auth, its files under ``root``:
    yields (address, user, password)."""
    import subprocess
    import time

    import bcrypt
    import requests

    port = free_port()
    user, password = "ci-pusher", "s3cret-Registry-Pass"
    (root / "htpasswd").write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}\n")
    (root / "registry.yml").write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
        f"auth: {{htpasswd: {{realm: modelcd-test, path: {root / 'htpasswd'}}}}}\n")
    with open(root / "registry.log", "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "registry.yml")], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 401:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (root / "registry.log").read_text()
            time.sleep(0.1)
        yield f"127.0.0.1:{port}", user, password
    finally:
        proc.terminate()
        proc.wait(timeout=10)
