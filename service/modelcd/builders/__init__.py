"""Builders: what the build stage makes from a version's files for a deployment of a given
target (a bundle for ``process``, a scoring image for ``docker``). One interface
(``Builder``), chosen by the environment's target kind from the settings."""

from __future__ import annotations

from modelcd.builders.base import Builder, BuildSpec
from modelcd.builders.bundle import BundleBuilder, build_bundle
from modelcd.builders.image import ImageBuilder, ImageOptions
from modelcd.config import Settings
from modelcd.ports import Ports

# target kind -> factory of a Builder from the settings; a new target whose deployments run
# something else adds one line here.
BUILDERS: Ports[[Settings], Builder] = Ports(
    {"docker": lambda settings: ImageBuilder(settings.home, ImageOptions.from_settings(settings)),
     "process": lambda settings: BundleBuilder(settings.home, python=settings.python)},
    unknown="no builder for target {name!r}; known targets: {known}", field="target")


def get_builder(target: str, settings: Settings) -> Builder:
    """The builder for deployments of the target kind ``target``, configured from ``settings``;
    ConfigError lists the known target kinds."""
    return BUILDERS.create(target, settings)


__all__ = ["BUILDERS", "BuildSpec", "Builder", "BundleBuilder", "ImageBuilder", "build_bundle", "get_builder"]
