"""The ``Builder`` interface: what a deployment needs, made from a version's files.

Each target runs something else: the ``process`` target a bundle (a folder beside a shared
virtualenv), the ``docker`` target a scoring image. Every builder keeps the same contract,
so the build stage never knows which one it calls. Errors are always ``modelcd.errors``
types: BuildError for a version that cannot be built, Cancelled when a person stopped the job.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelcd.domain import Bundle, ModelVersion

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildSpec:
    """What to build: an options object, so the interface can grow without new arguments."""

    version: ModelVersion  # the version to build: flavor, model file or entry script, requirements, digest
    files_dir: Path  # the version's files, materialised by the registry; only read


class Builder(ABC):
    """Makes what a deployment of one target kind runs. Implementations live beside the
    code they wrap and are chosen by the environment's target through
    ``modelcd.builders.get_builder``."""

    @abstractmethod
    def build(self, spec: BuildSpec, log: Log, cancel: threading.Event) -> Bundle:
        """Build (or find) what a deployment of ``spec.version`` needs and block until it is complete.

        Returns the ``Bundle`` the deploy stage hands to the target (for the docker target it
        names the image as well). Idempotent: building the same version again finds what an
        earlier build made and reuses it. Progress goes to ``log`` one line at a time. Raises
        BuildError naming the cause (a bad entry script, a requirement that cannot be
        installed, a missing file, an engine that does not answer) and Cancelled when
        ``cancel`` is set; in both cases nothing half-built is left under its final name.
        """
