"""The runner's deploy stage on a real engine and a real registry: an engine that does not have
the release's image pulls it *by digest* with the runner's credentials, starts it with the
service's labels and reports the digest the container actually runs; wrong credentials fail
naming the image, never the password."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from modelcd.builders.image import ImageOptions, build_image
from modelcd.config import load_settings
from modelcd.errors import DeployError
from modelcd.pipelines.runner_stages import deploy
from modelcd.targets.process import probe
from tests.containers.conftest import BaseImage, iris_version, local_registry


def _work(bundle: Any, deployment_id: str) -> dict[str, Any]:
    repo = bundle.image.rpartition(":")[0]
    return {"deployment_id": deployment_id, "model": "pulled", "version": 1, "environment": "production",
            "image": bundle.image, "image_digest": bundle.image_digest, "pull": f"{repo}@{bundle.image_digest}",
            "workers": 1, "health_timeout_s": 60, "env": {"GREETING": "hello"}, "cpu": None, "memory": None,
            "network": "host", "instance": "service-instance-1", "username_env": "CI_REGISTRY_USER",
            "password_env": "CI_REGISTRY_PASSWORD"}


def test_deploy_in_the_runner_pulls_by_digest_and_reports_what_runs(
        docker_home: Path, base_image: BaseImage, tmp_path: Path, engine: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "registry").mkdir()
    with local_registry(tmp_path / "registry") as (address, user, password):
        options = ImageOptions(base_image=base_image.tag, repository="modelcd-test", registry=address,
                               registry_username=user, registry_password=password)
        version = iris_version(tmp_path / "model", "pulled", 1)
        bundle = build_image(docker_home, version, tmp_path / "model", options, lambda _: None, threading.Event())
        assert bundle.image_digest and bundle.image_digest.startswith("sha256:")
        engine.images.remove(bundle.image_id, force=True)  # this engine forgets it: deploy must pull

        settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "runner-home")})
        monkeypatch.setenv("CI_REGISTRY_USER", user)
        monkeypatch.setenv("CI_REGISTRY_PASSWORD", "not-the-password")
        lines: list[str] = []
        with pytest.raises(DeployError) as refused:
            deploy(None, settings, _work(bundle, "d-00000000000a"), lines.append, threading.Event())  # type: ignore[arg-type]
        assert bundle.image_digest in refused.value.message and "not-the-password" not in refused.value.message

        monkeypatch.setenv("CI_REGISTRY_PASSWORD", password)
        work = _work(bundle, "d-00000000000b")
        try:
            report = deploy(None, settings, work, lines.append, threading.Event())  # type: ignore[arg-type]
            assert report["image"] == work["pull"] and report["image_digest"] == bundle.image_digest
            assert f"pulling {work['pull']}" in lines and password not in "\n".join(lines)
            container = engine.containers.get("modelcd-d-00000000000b")
            assert container.labels["io.modelcd.instance"] == "service-instance-1"  # the service's, not the runner's
            assert "GREETING=hello" in container.attrs["Config"]["Env"]
            assert container.attrs["Config"]["Image"] == work["pull"]
            health = probe(report["port"])
            assert health is not None and health["model"] == "pulled" and str(health["version"]) == "1"
        finally:
            for name in ("modelcd-d-00000000000a", "modelcd-d-00000000000b"):
                for c in engine.containers.list(all=True, filters={"name": name}):
                    c.remove(force=True)
