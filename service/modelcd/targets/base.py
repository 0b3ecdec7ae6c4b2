"""The ``Target`` interface: where deployments (scoring services) run.

Every target keeps the same contract, so the deploy stage, the retire job and the
control plane's restart logic never know which one they talk to. Errors are always
``modelcd.errors`` types: DeployError for a deployment that cannot start or serve,
Cancelled when a person stopped the job.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from modelcd.domain import Bundle, Deployment

Log = Callable[[str], None]


@dataclass(frozen=True)
class DeploySpec:
    """What to deploy: an options object, so the interface can grow without new arguments."""

    deployment_id: str  # unique, safe as a file name; the target's handle on the deployment
    model: str
    version: int
    environment: str
    bundle: Bundle  # what the build stage made
    workers: int = 2  # scoring worker processes
    health_timeout_s: float = 60.0  # create() gives up after this long without a healthy answer
    scoring_key: str | None = field(default=None, repr=False)  # secret: never printed
    env: Mapping[str, str] = field(default_factory=dict)  # the policy's environment variables (names logged only)
    cpu: float | None = None  # CPUs (docker: enforced; process: not enforced)
    memory: str | None = None  # memory limit, e.g. "512m" (docker: enforced; process: not enforced)
    network: str | None = None  # docker: bridge | host; None: the target's default
    port: int | None = None  # process: the port to take again (a wake from sleep); taken meanwhile: another one


@dataclass(frozen=True)
class RunningDeployment:
    """A deployment that answered its health check; what the control plane records."""

    deployment_id: str
    target: str  # name of the target that runs it (``process``, ``docker``)
    url: str  # scoring base URL, e.g. http://127.0.0.1:41234 (``/score``, ``/healthz``)
    pid: int  # the process the target started; its process group holds the workers
    port: int
    log_path: Path  # stdout/stderr of the scoring service


class Target(ABC):
    """Runs scoring services. Implementations live in one module each and are chosen by
    name through ``modelcd.targets.get_target``.

    Deployments outlive the control plane: a target must not tie a deployment's life to
    the process that created it, and a restarted control plane finds them again with
    ``adopt``.
    """

    name: ClassVar[str]

    @abstractmethod
    def create(self, spec: DeploySpec, log: Log, cancel: threading.Event) -> RunningDeployment:
        """Start the deployment described by ``spec`` and block until it can serve.

        Returns once ``GET {url}/healthz`` answered 200 for ``spec.model``/``spec.version``.
        Progress goes to ``log`` one line at a time. Raises DeployError naming the cause
        (with the last lines of the service's log when it exited or never became healthy
        within ``spec.health_timeout_s``) and Cancelled when ``cancel`` is set; before
        raising, everything this call started is stopped, so a failed or cancelled create
        leaves nothing running. Not idempotent by itself: call ``adopt`` with what was
        recorded first to find a deployment a crashed control plane already started.
        """

    @abstractmethod
    def is_alive(self, rd: RunningDeployment) -> bool:
        """True when ``rd`` still runs (the same deployment, not a recycled id) and answers
        its health check. Never raises for a dead or unknown deployment."""

    def exited(self, record: Deployment) -> bool:
        """A cheap look, without asking the deployment anything: True when its process (or
        container) is known to be gone, so the supervisor starts it again at once rather than
        at the next reconcile. Never raises; the default (False) leaves it to reconcile."""
        return False

    @abstractmethod
    def adopt(self, record: Deployment) -> RunningDeployment | None:
        """Find again a deployment the control plane recorded (pid, port, url, bundle).

        Returns it when the recorded process still runs that very deployment (checked by
        identity, not by id alone: an id may have been recycled) and it is healthy for the
        recorded model and version; otherwise None, and the caller starts a new one.
        Never stops or changes anything.
        """

    @abstractmethod
    def delete(self, rd: RunningDeployment) -> None:
        """Stop the deployment and everything it started, then return.

        Idempotent: deleting a deployment that is already gone (or whose id now belongs to
        an unrelated process, which is left alone) succeeds. Asks politely first (SIGTERM
        or the target's equivalent), then forces after a grace period. Raises DeployError
        only when the deployment is still running afterwards.
        """

    @abstractmethod
    def logs(self, rd: RunningDeployment, tail: int = 200) -> str:
        """The last ``tail`` lines of the deployment's output ("" if there is none yet)."""
