"""The one place modelcd opens a Docker engine: any engine the docker SDK reaches
(``docker_host`` setting, else ``$DOCKER_HOST``, else the local socket), with errors that
say where it looked and how to fix it."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from modelcd.errors import ModelcdError

if TYPE_CHECKING:
    import docker

DEFAULT_HOST = "unix:///var/run/docker.sock"
# a docker repository path component (distribution/reference): lowercase alnum runs joined by
# '.', '_', '__' or dashes
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$")


def engine_url(docker_host: str | None) -> str:
    """Where the engine is looked for."""
    return docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def connect(docker_host: str | None, error: type[ModelcdError], timeout: float = 60.0) -> docker.DockerClient:
    """A client of the engine at ``docker_host`` that answered a ping; raise ``error``
    (BuildError, DeployError...) naming the engine URL and the fix when none answers."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError as e:  # pragma: no cover - docker is a dependency
        raise error("the docker SDK is not installed; `pip install docker`") from e
    url = engine_url(docker_host)
    try:
        client = docker.DockerClient(base_url=url, timeout=int(timeout))
        client.ping()
    except (DockerException, OSError) as e:
        raise error(f"Docker engine not reachable at {url}: {_short(e)}; start dockerd or set docker_host "
                    "(MODELCD_DOCKER_HOST) / DOCKER_HOST to a reachable engine", field="docker_host") from e
    return client


def repository_component(name: str) -> str:
    """``name`` as a valid docker repository path component (lowercase, separators squeezed).

    Model names allow upper case and repeated or trailing '.', '_', '-'; image references do
    not. The exact name travels in the image's labels.
    """
    text = re.sub(r"[^a-z0-9._-]+", "-", name.lower())
    text = re.sub(r"[._-]{2,}", "-", text).strip("._-")
    if not _COMPONENT.match(text):
        raise ValueError(f"{name!r} cannot be turned into an image repository name")
    return text


def check_reference(ref: str, field: str, error: type[ModelcdError]) -> str:
    """Refuse an image reference that could not be one (spaces, newlines, shell text)."""
    if not _REFERENCE.match(ref):
        raise error(f"{ref!r} is not an image reference (e.g. python:3.11-slim or registry:5000/team/image:tag)",
                    field=field)
    return ref


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
