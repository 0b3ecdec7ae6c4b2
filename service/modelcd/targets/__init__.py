"""Deploy targets: where scoring services run. One interface (``Target``), one module per
implementation, chosen by name from the settings."""

from __future__ import annotations

from collections.abc import Callable

from modelcd.config import Settings
from modelcd.errors import ConfigError
from modelcd.targets.base import DeploySpec, RunningDeployment, Target
from modelcd.targets.docker import DockerTarget
from modelcd.targets.process import ProcessTarget

# name -> factory; a new target adds one line here.
TARGETS: dict[str, Callable[[Settings], Target]] = {
    "process": lambda settings: ProcessTarget(settings.home),
    "docker": lambda settings: DockerTarget(settings.home, docker_host=settings.docker_host,
                                            network=settings.docker_network, publish_host=settings.docker_publish_host,
                                            url_host=settings.docker_url_host,
                                            bridge_network=settings.docker_bridge_network),
}


def get_target(name: str, settings: Settings) -> Target:
    """The target called ``name``, configured from ``settings``; ConfigError lists the known names."""
    factory = TARGETS.get(name)
    if factory is None:
        known = ", ".join(sorted(TARGETS))
        raise ConfigError(f"unknown target {name!r}; known targets: {known}", field="target")
    return factory(settings)


__all__ = ["TARGETS", "DeploySpec", "DockerTarget", "ProcessTarget", "RunningDeployment", "Target", "get_target"]
