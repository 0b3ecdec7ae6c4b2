"""The docker target on a real engine: start, health, adopt, logs, limits, removal; a crashing
container fails cleanly; any engine the SDK reaches (here one behind a TCP proxy)."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from modelcd.builders.image import ImageOptions, build_image
from modelcd.domain import Bundle, Deployment, DeploymentState, Flavor
from modelcd.errors import DeployError
from modelcd.targets.base import DeploySpec
from modelcd.targets.docker import DockerTarget
from tests.containers.conftest import containers_of, iris_version, remove_containers


@pytest.fixture(scope="module")
def iris_image(docker_home: Path, image_options: ImageOptions, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Bundle, Any]:
    folder = tmp_path_factory.mktemp("iris-dt")
    version = iris_version(folder, "iris-dt", 1)
    return build_image(docker_home, version, folder, image_options, lambda _: None, threading.Event()), version


@pytest.fixture
def target(tmp_path: Path, engine: Any) -> Iterator[DockerTarget]:
    t = DockerTarget(tmp_path / "home", network="host", grace_s=5)
    try:
        yield t
    finally:
        remove_containers(engine, t.home)


def _spec(bundle: Bundle, model: str = "iris-dt", version: int = 1, **kw: Any) -> DeploySpec:
    return DeploySpec(deployment_id=f"d-{uuid.uuid4().hex[:10]}", model=model, version=version,
                      environment="production", bundle=bundle, workers=1, health_timeout_s=60, **kw)


def test_create_serves_adopts_and_deletes(target: DockerTarget, iris_image: tuple[Bundle, Any], engine: Any) -> None:
    bundle, version = iris_image
    lines: list[str] = []
    spec = _spec(bundle, env={"MODEL_GREETING": "hello"}, cpu=0.5, memory="256m")
    rd = target.create(spec, lines.append, threading.Event())
    assert rd.url.startswith("http://127.0.0.1:") and rd.target == "docker" and rd.pid > 0
    r = requests.post(f"{rd.url}/score", json=version.sample, timeout=10)
    assert r.status_code == 200 and r.json()["predictions"] == version.expected
    assert any("healthy after" in ln for ln in lines) and any("MODEL_GREETING" in ln for ln in lines)
    assert not any("hello" in ln for ln in lines)  # values of the policy's variables are not logged

    container = engine.containers.get(DockerTarget.container_name(spec.deployment_id))
    host = container.attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 256 * 1024**2
    assert host["Init"] is True and host["RestartPolicy"]["Name"] == "on-failure"
    assert "ALL" in host["CapDrop"] and "no-new-privileges" in host["SecurityOpt"]
    assert "MODEL_GREETING=hello" in container.attrs["Config"]["Env"]
    assert container.labels["io.modelcd.deployment"] == spec.deployment_id

    assert target.is_alive(rd)
    record = Deployment(id=spec.deployment_id, model="iris-dt", version=1, environment="production", target="docker",
                        state=DeploymentState.READY, url=rd.url, pid=rd.pid, port=rd.port, bundle=str(bundle.path),
                        release_id=None)
    # a new control plane (same home) finds it again; one with another home does not
    assert DockerTarget(target.home, network="host").adopt(record) == rd
    assert DockerTarget(target.home.parent / "other", network="host").adopt(record) is None
    wrong_version = Deployment(**{**record.__dict__, "version": 2})
    assert target.adopt(wrong_version) is None
    assert "modelcd-scoring listening" in target.logs(rd)

    target.delete(rd)
    assert containers_of(engine, target.home) == []
    assert not target.is_alive(rd) and target.adopt(record) is None
    assert "modelcd-scoring listening" in rd.log_path.read_text()  # output kept after removal
    target.delete(rd)  # idempotent


def test_container_that_crashes_on_start_fails_and_leaves_nothing(
        target: DockerTarget, docker_home: Path, image_options: ImageOptions, tmp_path: Path, engine: Any) -> None:
    files = tmp_path / "crash"
    files.mkdir()
    (files / "score.py").write_text("def init():\n    raise RuntimeError('model weights missing')\n\n"
                                    "def run(raw):\n    return raw\n")
    version = iris_version(tmp_path / "unused", "crasher", 1, flavor=Flavor.CUSTOM, model_file=None,
                           entry_script="score.py", requirements=(), sample={"data": [[1]]}, expected=None)
    bundle = build_image(docker_home, version, files, image_options, lambda _: None, threading.Event())
    with pytest.raises(DeployError) as e:
        target.create(_spec(bundle, model="crasher"), lambda _: None, threading.Event())
    assert "exited with code" in e.value.message and "model weights missing" in e.value.message
    assert containers_of(engine, target.home) == []


def test_bundle_without_image_is_refused(target: DockerTarget, iris_image: tuple[Bundle, Any]) -> None:
    bundle, _ = iris_image
    plain = Bundle(path=bundle.path, python=bundle.python, env_key=bundle.env_key, reused_env=True)
    with pytest.raises(DeployError, match="has no image"):
        target.create(_spec(plain), lambda _: None, threading.Event())


class _TcpToUnix:
    """A TCP listener on 127.0.0.1 forwarding to the engine's unix socket: an engine that is
    not the local socket, as DOCKER_HOST=tcp://... would give."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.socket_path)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


def test_any_engine_the_sdk_reaches(tmp_path: Path, iris_image: tuple[Bundle, Any], engine: Any) -> None:
    proxy = _TcpToUnix("/var/run/docker.sock")
    target = DockerTarget(tmp_path / "home", docker_host=f"tcp://127.0.0.1:{proxy.port}", network="host", grace_s=5)
    try:
        bundle, version = iris_image
        rd = target.create(_spec(bundle), lambda _: None, threading.Event())
        assert requests.post(f"{rd.url}/score", json=version.sample, timeout=10).status_code == 200
        target.delete(rd)
        assert proxy.connections > 0
        assert containers_of(engine, target.home) == []
    finally:
        remove_containers(engine, target.home)
        proxy.close()


def test_bridge_network_publishes_on_loopback(tmp_path: Path, iris_image: tuple[Bundle, Any], engine: Any) -> None:
    """network: bridge (the users' default) joins the configured bridge network and publishes
    the scoring port on 127.0.0.1 only; the container is reached through that published port."""
    name = f"modelcd-test-{uuid.uuid4().hex[:8]}"
    missing = DockerTarget(tmp_path / "home", network="bridge", bridge_network=name, grace_s=5)
    bundle, version = iris_image
    with pytest.raises(DeployError, match=f"no network '{name}'.*docker_bridge_network"):
        missing.create(_spec(bundle), lambda _: None, threading.Event())
    assert containers_of(engine, missing.home) == []

    network = engine.networks.create(name, driver="bridge")
    target = DockerTarget(tmp_path / "home", network="bridge", bridge_network=name, grace_s=5)
    try:
        lines: list[str] = []
        rd = target.create(_spec(bundle), lines.append, threading.Event())
        assert any(f"network bridge ({name})" in ln for ln in lines)
        container = engine.containers.get(DockerTarget.container_name(rd.deployment_id))
        assert list(container.attrs["NetworkSettings"]["Networks"]) == [name]
        bindings = container.attrs["NetworkSettings"]["Ports"]["8080/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
        assert rd.url == f"http://127.0.0.1:{bindings[0]['HostPort']}"
        r = requests.post(f"{rd.url}/score", json=version.sample, timeout=10)
        assert r.status_code == 200 and r.json()["predictions"] == version.expected
        target.delete(rd)
        assert containers_of(engine, target.home) == []
    finally:
        remove_containers(engine, target.home)
        network.remove()
