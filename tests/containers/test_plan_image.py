"""A release plan for a docker environment asks the engine whether the version's image is
already there: not yet, then (once the tag exists) a cache hit."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from modelcd.config import load_settings
from modelcd.context import build_context
from modelcd.registry.archive import pack_tree
from modelcd.registry.service import parse_metadata
from modelcd.releases.plan import plan_release
from tests.conftest import free_port, iris_model
from tests.containers.conftest import BaseImage


def test_the_plan_says_whether_the_engine_has_the_image(engine: Any, base_image: BaseImage, tmp_path: Path) -> None:
    ctx = build_context(load_settings(environ={
        "MODELCD_HOME": str(tmp_path / "home"), "MODELCD_TOKEN": "plan-docker-token-0123456789",
        "MODELCD_ROUTER_PORT": str(free_port()), "MODELCD_DOCKER_REPOSITORY": "modelcd-plan-test",
        "MODELCD_DOCKER_BASE_IMAGE": base_image.tag}))
    try:
        ctx.policies.put("name: images\nenvironments: [{name: production, target: docker, network: host}]\n")
        meta = iris_model(tmp_path / "m")
        v = ctx.registry.register("iris", io.BytesIO(pack_tree(tmp_path / "m")), parse_metadata(meta))
        [env] = plan_release(ctx, "iris", v.version).environments
        tag = f"modelcd-plan-test/iris:{v.version}-{v.digest12}"
        assert env.artifact["image"] == tag and env.artifact["base_image"] == base_image.tag
        assert env.artifact["image_built"] is False and env.artifact["cache_hit"] is False
        assert env.deployment["network"] == "host"
        repository, _, version_tag = tag.rpartition(":")
        engine.images.get(base_image.tag).tag(repository, version_tag)  # stands for an earlier build of it
        try:
            [env] = plan_release(ctx, "iris", v.version).environments
            assert env.artifact["image_built"] is True and env.artifact["cache_hit"] is True
        finally:
            with contextlib.suppress(Exception):
                engine.images.remove(tag)
    finally:
        ctx.db.dispose()
