"""The ``docker`` target: each deployment is a container of the version's scoring image on
any engine the docker SDK reaches (``docker_host`` / ``$DOCKER_HOST``).

Containers are named ``modelcd-{deployment id}`` and labelled with the deployment, the model,
the version and this control plane's instance (a hash of its home), so a restarted control
plane finds its own containers again and never touches another's. ``network: bridge``
joins ``docker_bridge_network`` and publishes the scoring port on ``docker_publish_host``
(a port the engine picks); ``host``
shares the engine host's network and binds a free port there. Containers run with
``--init`` (zombies reaped), no capabilities, ``no-new-privileges``, the image's
unprivileged user, an ``on-failure`` restart policy and the policy's cpu/memory limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

from modelcd.docker_engine import connect
from modelcd.domain import Deployment
from modelcd.errors import Cancelled, DeployError
from modelcd.targets.base import DeploySpec, Log, RunningDeployment, Target
from modelcd.targets.process import ID_ENV, KEY_ENV, free_port, probe, tail_lines

LABEL = "io.modelcd."
IMAGE_PORT = 8080  # the port scoring images listen on in bridge mode (modelcd.builders.image.PORT)
_POLL_S = 0.1


class DockerTarget(Target):
    """Scoring containers on a Docker engine."""

    name = "docker"

    def __init__(self, home: Path, *, docker_host: str | None = None, network: str = "bridge",
                 publish_host: str = "127.0.0.1", url_host: str = "127.0.0.1", grace_s: float = 10.0,
                 restart_retries: int = 3, bridge_network: str = "bridge", instance: str | None = None) -> None:
        self.home = Path(home).absolute()
        self.docker_host = docker_host
        self.network = network
        self.bridge_network = bridge_network
        self.publish_host = publish_host
        self.url_host = url_host
        self.grace_s = grace_s
        self.restart_retries = restart_retries
        # the control plane whose containers these are (a pipeline's runner passes the service's)
        self.instance = instance or hashlib.sha256(str(self.home).encode()).hexdigest()[:16]
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The engine's client, connected on first use (DeployError when none answers)."""
        with self._lock:
            if self._client is None:
                self._client = connect(self.docker_host, DeployError)
            return self._client

    @staticmethod
    def container_name(deployment_id: str) -> str:
        return f"modelcd-{deployment_id}"

    def log_path(self, deployment_id: str) -> Path:
        """Where a removed container's output is kept."""
        return self.home / "deployments" / f"{deployment_id}.log"

    # -- Target --------------------------------------------------------------------------

    def create(self, spec: DeploySpec, log: Log, cancel: threading.Event) -> RunningDeployment:
        """See ``Target.create``."""
        image = spec.bundle.image
        if not image:
            raise DeployError(f"{spec.model} v{spec.version} has no image: its bundle was built for another target; "
                              "run the build stage again with target: docker")
        if cancel.is_set():
            raise Cancelled(f"deployment {spec.deployment_id} stopped before it started")
        self._remove_leftover(spec.deployment_id, log)
        network = spec.network or self.network
        container = self._run(spec, image, network, log)
        try:
            port = self._port(container, network, spec)
            url = f"http://{self.url_host}:{port}"
            started = time.monotonic()
            self._wait_healthy(spec, container, port, cancel)
            log(f"healthy after {time.monotonic() - started:.1f}s at {url}")
            output = _logs(container, 20)
            if output.strip():
                log("container output:\n" + output)
            return RunningDeployment(deployment_id=spec.deployment_id, target=self.name, url=url,
                                     pid=int(container.attrs["State"].get("Pid") or 0), port=port,
                                     log_path=self.log_path(spec.deployment_id))
        except BaseException:
            self._discard(container)
            raise

    def is_alive(self, rd: RunningDeployment) -> bool:
        """See ``Target.is_alive``."""
        try:
            container = self._own(rd.deployment_id)
        except DeployError:
            return False
        return (container is not None and container.status == "running"
                and probe(rd.port, host=self.url_host) is not None)

    def exited(self, record: Deployment) -> bool:
        """See ``Target.exited``: our container for it is gone or not running."""
        try:
            container = self._own(record.id)
        except DeployError:
            return False  # the engine did not answer: reconcile will look again
        return container is None or container.status != "running"

    def adopt(self, record: Deployment) -> RunningDeployment | None:
        """See ``Target.adopt``: our container for this deployment, running, healthy for the
        recorded model and version on the recorded port."""
        if record.target != self.name or not record.port:
            return None
        try:
            container = self._own(record.id)
        except DeployError:
            return None
        if container is None or container.status != "running":
            return None
        labels = container.labels
        if labels.get(f"{LABEL}model") != record.model or labels.get(f"{LABEL}version") != str(record.version):
            return None
        health = probe(record.port, host=self.url_host)
        if health is None or health.get("model") != record.model or str(health.get("version")) != str(record.version):
            return None
        return RunningDeployment(deployment_id=record.id, target=self.name, url=f"http://{self.url_host}:{record.port}",
                                 pid=int(container.attrs["State"].get("Pid") or 0), port=record.port,
                                 log_path=self.log_path(record.id))

    def delete(self, rd: RunningDeployment) -> None:
        """See ``Target.delete``: stop (SIGTERM, SIGKILL after ``grace_s``), keep the output
        in the deployment's log file, remove the container."""
        from docker.errors import APIError, NotFound

        container = self._own(rd.deployment_id)
        if container is None:
            return
        try:
            with contextlib.suppress(NotFound):
                container.stop(timeout=int(self.grace_s))
                _save_logs(container, self.log_path(rd.deployment_id))
                container.remove(force=True)
        except APIError as e:
            raise DeployError(f"deployment {rd.deployment_id}: cannot remove container {container.name}: "
                              f"{e.explanation or e}") from e
        if self._own(rd.deployment_id) is not None:
            raise DeployError(f"deployment {rd.deployment_id}: container {container.name} is still there after removal")

    def logs(self, rd: RunningDeployment, tail: int = 200) -> str:
        """See ``Target.logs``: the container's output, or what was kept when it was removed."""
        try:
            container = self._own(rd.deployment_id)
        except DeployError:
            container = None
        if container is None:
            return tail_lines(rd.log_path, tail)
        return _logs(container, tail)

    # -- steps ---------------------------------------------------------------------------

    def _labels(self, spec: DeploySpec) -> dict[str, str]:
        return {f"{LABEL}deployment": spec.deployment_id, f"{LABEL}instance": self.instance,
                f"{LABEL}model": spec.model, f"{LABEL}version": str(spec.version),
                f"{LABEL}environment": spec.environment, f"{LABEL}managed-by": "modelcd"}

    def _run(self, spec: DeploySpec, image: str, network: str, log: Log) -> Any:
        from docker.errors import APIError, ImageNotFound

        env = dict(spec.env)
        env.update({ID_ENV: spec.deployment_id, "MODELCD_SCORING_WORKERS": str(spec.workers)})
        kwargs: dict[str, Any] = {}
        if network == "host":
            port = free_port()
            env.update(MODELCD_SCORING_HOST=self.publish_host, MODELCD_SCORING_PORT=str(port))
            kwargs["network_mode"] = "host"
        else:
            env["MODELCD_SCORING_PORT"] = str(IMAGE_PORT)
            kwargs["ports"] = {f"{IMAGE_PORT}/tcp": (self.publish_host, None)}
            kwargs["network"] = self._bridge()
        if spec.scoring_key:
            env[KEY_ENV] = spec.scoring_key
        if spec.cpu:
            kwargs["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.memory:
            kwargs["mem_limit"] = spec.memory
        name = self.container_name(spec.deployment_id)
        try:
            container = self.client.containers.run(
                image, detach=True, name=name, labels=self._labels(spec), environment=env, init=True,
                restart_policy={"Name": "on-failure", "MaximumRetryCount": self.restart_retries},
                security_opt=["no-new-privileges"], cap_drop=["ALL"], **kwargs)
        except ImageNotFound as e:
            raise DeployError(f"image {image} is not on the engine and cannot be pulled: {e.explanation or e}; "
                              "run the build stage again (or configure docker_registry)") from e
        except APIError as e:
            raise DeployError(f"the engine refused to start {image}: {e.explanation or e}") from e
        limits = ", ".join(f"{k}={v}" for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v) or "no limits"
        names = ", ".join(sorted(spec.env)) or "none"
        where = f"bridge ({kwargs['network']})" if "network" in kwargs else network
        log(f"started container {name} ({container.short_id}) from {image}: network {where}, {limits}, "
            f"environment variables from the policy: {names}")
        return container

    def _bridge(self) -> str:
        """The bridge network's name, checked to exist (an engine run with ``--bridge=none`` has
        no default ``bridge``)."""
        from docker.errors import NotFound

        try:
            self.client.networks.get(self.bridge_network)
        except NotFound as e:
            raise DeployError(f"the engine has no network {self.bridge_network!r} for network: bridge; create it "
                              f"(`docker network create {self.bridge_network}`), set docker_bridge_network to an "
                              "existing bridge network, or use network: host") from e
        return self.bridge_network

    def _port(self, container: Any, network: str, spec: DeploySpec) -> int:
        if network == "host":
            return int(_env_of(container, "MODELCD_SCORING_PORT"))
        deadline = time.monotonic() + 10
        while True:
            container.reload()
            bindings = (container.attrs["NetworkSettings"].get("Ports") or {}).get(f"{IMAGE_PORT}/tcp") or []
            if bindings:
                return int(bindings[0]["HostPort"])
            if container.status in ("exited", "dead") or time.monotonic() > deadline:
                raise DeployError(f"container of {spec.model} v{spec.version} got no published port "
                                  f"(status {container.status}); last lines:\n{_logs(container, 20) or '(no output)'}")
            time.sleep(_POLL_S)

    def _wait_healthy(self, spec: DeploySpec, container: Any, port: int, cancel: threading.Event) -> None:
        deadline = time.monotonic() + spec.health_timeout_s
        while True:
            if cancel.is_set():
                raise Cancelled(f"deployment {spec.deployment_id} stopped while starting")
            container.reload()
            state = container.attrs["State"]
            if state.get("Status") in ("exited", "dead") or container.attrs.get("RestartCount", 0) > 0:
                raise DeployError(f"container of {spec.model} v{spec.version} exited with code "
                                  f"{state.get('ExitCode')} before it was healthy"
                                  f"{' (' + state['Error'] + ')' if state.get('Error') else ''}; last lines:\n"
                                  f"{_logs(container, 20) or '(no output)'}")
            health = probe(port, timeout=1.0, host=self.url_host)
            if (health is not None and health.get("model") == spec.model
                    and str(health.get("version")) == str(spec.version)):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"container of {spec.model} v{spec.version} was not healthy within "
                                  f"{spec.health_timeout_s:g}s; last lines:\n{_logs(container, 20) or '(no output)'}")
            time.sleep(_POLL_S)

    def _own(self, deployment_id: str) -> Any:
        """Our container for ``deployment_id``, or None (absent, or another control plane's)."""
        from docker.errors import APIError, NotFound

        try:
            container = self.client.containers.get(self.container_name(deployment_id))
        except NotFound:
            return None
        except APIError as e:
            raise DeployError(f"cannot inspect the container of {deployment_id}: {e.explanation or e}") from e
        labels = container.labels
        if labels.get(f"{LABEL}deployment") != deployment_id or labels.get(f"{LABEL}instance") != self.instance:
            return None
        return container

    def _remove_leftover(self, deployment_id: str, log: Log) -> None:
        """A container of this deployment left by a crash between start and record: remove it."""
        container = self._own(deployment_id)
        if container is not None:
            log(f"removing leftover container {container.name}")
            self._discard(container)

    def _discard(self, container: Any) -> None:
        from docker.errors import APIError, NotFound

        with contextlib.suppress(NotFound, APIError):
            deployment_id = container.labels.get(f"{LABEL}deployment", "")
            if deployment_id:
                _save_logs(container, self.log_path(deployment_id))
            container.remove(force=True)


def _env_of(container: Any, name: str) -> str:
    for item in container.attrs["Config"].get("Env") or []:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return ""


def _logs(container: Any, tail: int) -> str:
    from docker.errors import APIError, NotFound

    try:
        data = container.logs(tail=tail, stdout=True, stderr=True)
    except (APIError, NotFound):
        return ""
    return data.decode("utf-8", errors="replace").rstrip("\n")


def _save_logs(container: Any, path: Path) -> None:
    """Append the container's whole output to ``path`` (kept after the container is gone)."""
    from docker.errors import APIError, NotFound

    with contextlib.suppress(APIError, NotFound, OSError):
        data = container.logs(stdout=True, stderr=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(f"--- modelcd: output of container {container.name}\n".encode())
            fh.write(data)
