"""Scoring images on a real engine: the offline base image, layer reuse across versions,
labels, failures that name their cause, and push/pull through a local registry."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelcd.builders.image import ImageOptions, build_image
from modelcd.domain import Flavor
from modelcd.errors import BuildError
from tests.containers.conftest import BaseImage, iris_version, local_registry


def test_base_image_is_built_offline_from_debian_packages(base_image: BaseImage, engine: Any) -> None:
    if base_image.built:
        text = "\n".join(base_image.log)
        assert "bootstrapping Debian bookworm" in text and f"built {base_image.tag}" in text
    image = engine.images.get(base_image.tag)
    assert image.id == base_image.image_id
    assert image.labels["org.opencontainers.image.vendor"] == "modelcd"
    out = engine.containers.run(base_image.tag, ["python3", "-c", "import sys, venv, ensurepip; print(sys.version)"],
                                remove=True, network_mode="none")
    assert out.decode().startswith("3.11.")


def _build(home: Path, version: Any, folder: Path, options: ImageOptions) -> tuple[Any, list[str]]:
    lines: list[str] = []
    bundle = build_image(home, version, folder, options, lines.append, threading.Event())
    return bundle, lines


def test_new_version_with_same_requirements_rebuilds_only_the_model_layer(
        docker_home: Path, image_options: ImageOptions, tmp_path: Path, engine: Any) -> None:
    v1 = iris_version(tmp_path / "v1", "iris-img", 1, c=1.0)
    b1, _ = _build(docker_home, v1, tmp_path / "v1", image_options)
    v2 = iris_version(tmp_path / "v2", "iris-img", 2, c=0.5)
    # content this engine has never seen, so its layer cache (kept across runs) holds no copy of it
    (tmp_path / "v2" / "build-id.txt").write_text(uuid.uuid4().hex)
    started = time.monotonic()
    b2, log2 = _build(docker_home, v2, tmp_path / "v2", image_options)
    warm_s = time.monotonic() - started

    assert b1.image == f"modelcd-test/iris-img:1-{v1.digest12}"
    assert b2.image == f"modelcd-test/iris-img:2-{v2.digest12}"
    text = "\n".join(log2)
    assert "reusing wheelhouse" in text and "reusing dependencies image modelcd-test-deps:cp311-" in text
    # the dependencies are in the image it builds FROM: the context holds the Dockerfile, runtime and model
    sent = [ln for ln in log2 if ln.startswith(f"building {b2.image} (")]
    assert sent and float(sent[0].split("(")[1].split()[0]) < 2.0, sent
    steps = [ln for ln in log2 if ln.startswith("Step ")]
    assert steps[0].startswith("Step 1/") and " : FROM modelcd-test-deps:cp311-" in steps[0], steps
    assert steps and steps[-3].split(" : ")[1].startswith("COPY app/"), steps
    # everything before the model's files comes from the cache: the FROM and the last 3 steps do not
    assert text.count("Using cache") == len(steps) - 4, text
    history1 = [layer["Id"] for layer in engine.api.history(b1.image_id)]
    history2 = [layer["Id"] for layer in engine.api.history(b2.image_id)]
    assert history2[3:] == history1[3:] and history2[:3] != history1[:3]
    assert warm_s < 30, warm_s  # generous on a shared machine; bench/docker_bench.py measures it

    image = engine.images.get(b2.image)
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    labels = image.labels
    assert labels["org.opencontainers.image.title"] == "iris-img"
    assert labels["org.opencontainers.image.version"] == "2"
    assert labels["org.opencontainers.image.revision"] == v2.digest
    assert labels["io.modelcd.digest"] == v2.digest and labels["io.modelcd.flavor"] == "sklearn"
    assert (b2.path / "Dockerfile").read_text().startswith("# Scoring image rendered by modelcd")
    assert (b2.path / "requirements.lock").read_text().count("==") >= 5
    # the wheels stay in the build stage: no layer of the image carries them
    assert not any("/tmp/wheels" in (layer.get("CreatedBy") or "") for layer in engine.api.history(b2.image_id))


def test_registry_strings_reach_the_image_as_labels_only(
        docker_home: Path, image_options: ImageOptions, tmp_path: Path, engine: Any) -> None:
    hostile = 'x" io.evil="1\n$(id) ${HOME} `id` \\'
    v = iris_version(tmp_path / "h", "Hostile.Name_", 1, description=hostile, external_ref="models:/a\"b/1")
    bundle, _ = _build(docker_home, v, tmp_path / "h", image_options)
    assert bundle.image is not None and bundle.image.startswith("modelcd-test/hostile.name:1-")
    labels = engine.images.get(bundle.image).labels
    assert labels["org.opencontainers.image.description"] == hostile
    assert labels["io.modelcd.model"] == "Hostile.Name_"
    assert labels["io.modelcd.external-ref"] == 'models:/a"b/1'
    assert "io.evil" not in labels
    dockerfile = (bundle.path / "Dockerfile").read_text()
    assert "Hostile" not in dockerfile and "$(id)" not in dockerfile


def test_failed_builds_name_their_cause(docker_home: Path, image_options: ImageOptions, tmp_path: Path) -> None:
    bad = iris_version(tmp_path / "bad", "broken", 1, requirements=("modelcd-no-such-package-xyz==1.0",))
    with pytest.raises(BuildError) as e:
        _build(docker_home, bad, tmp_path / "bad", image_options)
    assert "modelcd-no-such-package-xyz" in e.value.message and e.value.field == "requirements"

    script = tmp_path / "script"
    script.mkdir()
    (script / "score.py").write_text("def init():\n    pass\n\ndef run(raw)\n    return raw\n")
    custom = iris_version(tmp_path / "custom", "broken", 2, flavor=Flavor.CUSTOM, model_file=None,
                          entry_script="score.py", requirements=())
    with pytest.raises(BuildError) as e:
        _build(docker_home, custom, script, image_options)
    assert "score.py:4" in e.value.message

    good = iris_version(tmp_path / "good", "broken", 3)
    nowhere = ImageOptions(base_image=image_options.base_image, docker_host=f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(BuildError) as e:
        _build(docker_home, good, tmp_path / "good", nowhere)
    assert "not reachable" in e.value.message and "no-engine.sock" in e.value.message
    assert e.value.field == "docker_host"

    missing = ImageOptions(base_image="modelcd-test/no-such-base:1")
    with pytest.raises(BuildError) as e:
        _build(docker_home, good, tmp_path / "good", missing)
    assert "modelcd base-image build" in e.value.message and e.value.field == "docker_base_image"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    with local_registry(tmp_path) as found:
        yield found


def test_push_to_and_pull_from_a_local_registry(docker_home: Path, image_options: ImageOptions, tmp_path: Path,
                                                engine: Any, registry: tuple[str, str, str]) -> None:
    address, user, password = registry
    options = ImageOptions(base_image=image_options.base_image, repository="modelcd-test", registry=address,
                           registry_username=user, registry_password=password)
    v = iris_version(tmp_path / "p", "pushed", 1)
    bundle, log = _build(docker_home, v, tmp_path / "p", options)
    assert bundle.image == f"{address}/modelcd-test/pushed:1-{v.digest12}"
    assert f"pushed {bundle.image} ({bundle.image_digest})" in log and bundle.image_digest.startswith("sha256:")
    assert password not in "\n".join(log)

    engine.images.remove(bundle.image)
    pulled = engine.images.pull(bundle.image, auth_config={"username": user, "password": password})
    assert pulled.id == bundle.image_id

    wrong = ImageOptions(base_image=image_options.base_image, repository="modelcd-test", registry=address,
                         registry_username=user, registry_password="not-the-password")
    with pytest.raises(BuildError) as e:
        _build(docker_home, v, tmp_path / "p", wrong)
    assert "push" in e.value.message and "not-the-password" not in e.value.message
