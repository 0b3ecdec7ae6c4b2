"""The Builder port: one builder per target kind, chosen by name, configured from the settings."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from modelcd.builders import BUILDERS, BuildSpec, BundleBuilder, ImageBuilder, get_builder
from modelcd.builders.image import ImageOptions
from modelcd.config import Settings
from modelcd.errors import BuildError, ConfigError
from modelcd.releases.policy import TargetKind
from modelcd.targets import TARGETS

from .conftest import Built, Recorder, iris_version


def test_every_target_kind_has_a_builder() -> None:
    assert set(BUILDERS) == set(TARGETS) == {k.value for k in TargetKind}


def test_get_builder_configures_each_builder_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, python="python3", docker_base_image="base:1", docker_repository="repo",
                        docker_host="unix:///nowhere.sock", docker_build_timeout_s=60, docker_dependencies="engine")
    bundle = get_builder(TargetKind.PROCESS, settings)
    assert isinstance(bundle, BundleBuilder) and (bundle.home, bundle.python) == (tmp_path, "python3")
    image = get_builder("docker", settings)
    assert isinstance(image, ImageBuilder) and image.home == tmp_path
    assert image.options == ImageOptions.from_settings(settings)
    assert (image.options.base_image, image.options.repository, image.options.build_timeout_s,
            image.options.dependencies) == ("base:1", "repo", 60, "engine")


def test_an_unknown_dependencies_mode_is_refused_naming_the_setting_and_its_values(tmp_path: Path) -> None:
    from modelcd.config import load_settings

    with pytest.raises(ConfigError) as e:
        load_settings(environ={"MODELCD_HOME": str(tmp_path), "MODELCD_DOCKER_DEPENDENCIES": "conda"})
    assert "docker_dependencies" in str(e.value).lower() and "'engine'" in str(e.value), str(e.value)


def test_an_unknown_target_is_an_error_listing_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        get_builder("kubernetes", Settings(home=tmp_path))
    assert e.value.field == "target" and "docker, process" in str(e.value)


def test_the_bundle_builder_makes_the_bundle_build_bundle_makes(built: Built, shared_home: Path,
                                                                iris_files: Path) -> None:
    log = Recorder()
    bundle = BundleBuilder(shared_home).build(BuildSpec(iris_version(iris_files), iris_files), log, threading.Event())
    first = built.bundle
    assert (bundle.path, bundle.python, bundle.env_key) == (first.path, first.python, first.env_key)
    assert bundle.reused_env and "reusing bundle" in log.text


def test_the_image_builder_asks_the_engine_its_options_name(tmp_path: Path, iris_files: Path) -> None:
    builder = ImageBuilder(tmp_path, ImageOptions(docker_host=f"unix://{tmp_path}/no-engine.sock"))
    with pytest.raises(BuildError) as e:
        builder.build(BuildSpec(iris_version(iris_files), iris_files), Recorder(), threading.Event())
    assert "no-engine.sock" in str(e.value)
