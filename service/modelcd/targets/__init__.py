"""Deploy targets: where scoring services run. One interface (``Target``), one module per
implementation, chosen by name from the settings."""

from __future__ import annotations

from modelcd.config import Settings
from modelcd.ports import Ports
from modelcd.targets.base import DeploySpec, RunningDeployment, Target
from modelcd.targets.docker import DockerTarget
from modelcd.targets.process import ProcessTarget


def _docker(settings: Settings) -> Target:
    return DockerTarget(settings.home, docker_host=settings.docker_host, network=settings.docker_network,
                        publish_host=settings.docker_publish_host, url_host=settings.docker_url_host,
                        bridge_network=settings.docker_bridge_network)


# name -> factory of a Target from the settings; a new target adds one line here.
TARGETS: Ports[[Settings], Target] = Ports(
    {"docker": _docker, "process": lambda settings: ProcessTarget(settings.home, warm_starts=settings.warm_starts)},
    unknown="unknown target {name!r}; known targets: {known}", field="target")


def get_target(name: str, settings: Settings) -> Target:
    """The target called ``name``, configured from ``settings``; ConfigError lists the known names."""
    return TARGETS.create(name, settings)


__all__ = ["TARGETS", "DeploySpec", "DockerTarget", "ProcessTarget", "RunningDeployment", "Target", "get_target"]
