"""Dependencies images on a real engine: a cold build makes the virtualenv of the lock on the
host when the host has the image's Python (auto) and inside the engine otherwise (forced here
with ``engine``); either image serves the model exactly, with its bytecode valid in the image."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from modelcd.builders.image import ImageOptions, build_image
from modelcd.errors import Cancelled
from modelcd.targets.base import DeploySpec
from modelcd.targets.docker import DockerTarget
from tests.containers.conftest import BaseImage, iris_version, remove_containers

INSPECT = """\
import json, os, sys, sklearn
with open(sklearn.__spec__.cached, "rb") as fh:
    flags = int.from_bytes(fh.read(8)[4:], "little")
print(json.dumps({"prefix": sys.prefix, "python": os.path.realpath(sys.executable), "pyc_flags": flags,
                  "uid": os.getuid(), "leftovers": [p for p in ("/tmp/wheels", "/tmp/uv") if os.path.exists(p)],
                  "lock": open("/opt/modelcd/requirements.lock").read().count("==")}))
"""


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("dependencies", "made"), [("auto", "on the host with"), ("engine", "inside the engine")])
def test_cold_build_serves_the_model_whichever_way_the_venv_is_made(
        dependencies: str, made: str, docker_home: Path, base_image: BaseImage, tmp_path: Path, engine: Any) -> None:
    options = ImageOptions(base_image=base_image.tag, repository=f"modelcd-test-{dependencies}", no_cache=True,
                           dependencies=dependencies)
    version = iris_version(tmp_path / "m", f"deps-{dependencies}", 1, c=0.7)
    lines: list[str] = []
    bundle = build_image(docker_home, version, tmp_path / "m", options, lines.append, threading.Event())
    text = "\n".join(lines)
    assert f"building dependencies image modelcd-test-{dependencies}-deps:cp311-" in text and made in text, text
    assert bundle.image is not None

    facts = json.loads(engine.containers.run(bundle.image, ["/opt/modelcd/venv/bin/python", "-c", INSPECT],
                                             remove=True, network_mode="none").decode().strip().splitlines()[-1])
    assert facts["prefix"] == "/opt/modelcd/venv" and facts["python"].startswith("/usr/bin/python3")
    assert facts["pyc_flags"] == 1  # hash-based, unchecked: valid although the layer's files have time 0
    assert facts["uid"] == 10001 and facts["leftovers"] == [] and facts["lock"] >= 5

    target = DockerTarget(tmp_path / "home", network="host", grace_s=5)
    try:
        spec = DeploySpec(deployment_id=f"d-{uuid.uuid4().hex[:10]}", model=version.model, version=1,
                          environment="production", bundle=bundle, workers=1, health_timeout_s=60)
        rd = target.create(spec, lambda _: None, threading.Event())
        r = requests.post(f"{rd.url}/score", json=version.sample, timeout=10)
        assert r.status_code == 200 and r.json()["predictions"] == version.expected
        target.delete(rd)
    finally:
        remove_containers(engine, target.home)


def test_a_cancelled_dependencies_build_stops(docker_home: Path, base_image: BaseImage, tmp_path: Path) -> None:
    options = ImageOptions(base_image=base_image.tag, repository="modelcd-test-cancel", no_cache=True)
    version = iris_version(tmp_path / "m", "deps-cancel", 1)
    cancel = threading.Event()

    def log(line: str) -> None:
        if line.startswith("building dependencies image"):
            cancel.set()

    with pytest.raises(Cancelled):
        build_image(docker_home, version, tmp_path / "m", options, log, cancel)
