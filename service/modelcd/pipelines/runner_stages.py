"""What ``modelcd build|deploy|smoke --release ID`` does inside a CI runner when the policy
puts the stage there (``pipeline.stages``; the service's side is
``modelcd.releases.runner_reports``).

The runner holds what teams keep in CI: the Docker engine (``DOCKER_HOST``), the registry
credentials (its secrets, as environment variables the policy names) and the network path to
the target. So here:

- **build** downloads the release's model files from the service, checks their digest, builds
  the scoring image with the runner's engine (the same hermetic build as the service's:
  ``modelcd.builders.image``), pushes it to ``pipeline.registry`` and reports the reference
  and the registry's digest;
- **deploy** pulls that image *by digest* and starts it as a container of the release's
  deployment (the service's labels, so the service can retire it when it reaches the engine),
  and reports its URL and the digest the container actually runs;
- **smoke** tests the new scoring URL from the runner.

Every line of the stage's log goes to the service as it is written (and to the runner's own
output), so the service keeps the whole record; a person stopping the release stops the work
here. Secrets never leave this process: registry credentials travel to the engine in its API
header only, and a policy variable given by reference is read from the runner's environment.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from modelcd.analysis.smoke import Outcome, SmokeChecks, run_smoke
from modelcd.builders.image import PYTHON_IN_IMAGE, ImageOptions, build_image
from modelcd.client import ApiError, Client
from modelcd.config import Settings
from modelcd.domain import Bundle, Flavor, ModelVersion, Source
from modelcd.errors import BuildError, Cancelled, DeployError, ModelcdError
from modelcd.fsutil import atomic_dir
from modelcd.registry.archive import safe_extract, tree_digest
from modelcd.releases.deployments import resolve_env
from modelcd.targets import get_target
from modelcd.targets.base import DeploySpec, RunningDeployment
from modelcd.targets.docker import DockerTarget

Echo = Callable[[str], None]
FLUSH_S = 0.5  # log lines reach the service within this long
HEARTBEAT_S = 10.0  # a post at least this often, lines or not: the stage is alive
MAX_FILES_BYTES = 20 * 1024**3


class StageLog:
    """The stage's log: each line printed here and sent to the service in batches by a
    background thread; ``cancel`` is set when the service says a person stopped the release."""

    def __init__(self, client: Client, release_id: str, job_id: str, echo: Echo) -> None:
        self.client, self.echo = client, echo
        self.path = f"/api/v1/releases/{release_id}/jobs/{job_id}/log"
        self.cancel = threading.Event()
        self._lines: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="stage-log", daemon=True)
        self._thread.start()

    def __call__(self, line: str) -> None:
        self.echo(line)
        self._lines.put(line)

    def _pump(self) -> None:
        last = time.monotonic()
        while True:
            stopping = self._stop.wait(FLUSH_S)
            lines: list[str] = []
            with contextlib.suppress(queue.Empty):
                while len(lines) < 500:
                    lines.append(self._lines.get_nowait())
            if lines or time.monotonic() - last >= HEARTBEAT_S:
                self._send(lines)
                last = time.monotonic()
            if stopping and self._lines.empty():
                return

    def _send(self, lines: list[str]) -> None:
        for attempt in range(3):
            try:
                answer = self.client.post(self.path, json={"lines": lines}, timeout=30)
            except ApiError as e:
                if e.status in (401, 404, 409):  # the release ended (token revoked) or the job is not ours: stop
                    self.echo(f"(the service refused the log: {e.message}; stopping)")
                    self.cancel.set()
                    return
                if attempt == 2:
                    self.echo(f"(could not send {len(lines)} log lines to the service: {e.message})")
                time.sleep(1.0)
                continue
            except ModelcdError as e:
                if attempt == 2:
                    self.echo(f"(could not send {len(lines)} log lines to the service: {e.message})")
                time.sleep(1.0)
                continue
            if answer.get("cancel"):
                self.cancel.set()
            return

    def close(self) -> None:
        """Send what is left, then stop."""
        self._stop.set()
        self._thread.join(timeout=60)


def run(client: Client, settings: Settings, began: dict[str, Any], echo: Echo) -> dict[str, Any]:
    """Do the stage ``began`` describes (the answer of ``…/stages/{stage}/begin``) and report
    its outcome to the service; return the service's answer (the stage command's result)."""
    stage, release_id, job_id = began["stage"], began["release_id"], began["job_id"]
    log = StageLog(client, release_id, job_id, echo)
    outcome, error, report = "succeeded", "", {}
    try:
        report = STAGES[stage](client, settings, began["work"], log, log.cancel)
    except Cancelled as e:
        outcome, error = "cancelled", e.message
    except ModelcdError as e:
        outcome, error = "failed", e.message
        log(f"failed: {e.message}")
    except Exception as e:  # an internal error still closes the stage (and says what it was)
        outcome, error = "failed", f"internal error in the runner: {type(e).__name__}: {e}"
        log(error)
    finally:
        log.close()
    return dict(client.post(f"/api/v1/releases/{release_id}/jobs/{job_id}/finish",
                            json={"outcome": outcome, "error": error, "report": report}, timeout=120))


# -- build ------------------------------------------------------------------------------


def build(client: Client, settings: Settings, work: dict[str, Any], log: Echo,
          cancel: threading.Event) -> dict[str, Any]:
    version = _version(work["version"])
    files = _fetch_files(client, settings.home, work["files"], version, log)
    image = work["image"]
    username = os.environ.get(image["username_env"]) if image.get("registry") else None
    password = os.environ.get(image["password_env"]) if image.get("registry") else None
    if image.get("registry") and bool(username) != bool(password):
        raise BuildError(f"registry credentials: set both {image['username_env']} and {image['password_env']} "
                         "(the runner's secrets) or neither", field="registry")
    options = ImageOptions(base_image=os.environ.get("MODELCD_DOCKER_BASE_IMAGE") or image["base_image"],
                           repository=image["repository"], docker_host=settings.docker_host,
                           registry=image.get("registry"), registry_username=username, registry_password=password,
                           build_timeout_s=settings.docker_build_timeout_s)
    log(f"building {version.model} v{version.version} with the runner's Docker engine"
        + (f", pushing to {options.registry}" if options.registry else " (no pipeline.registry: the image stays on "
           "this engine)"))
    bundle = build_image(settings.home, version, files, options, log, cancel)
    digest = bundle.image_digest or bundle.image_id
    log(f"image {bundle.image} digest {digest}")
    return {"image": bundle.image, "image_digest": digest, "image_id": bundle.image_id}


def _version(doc: dict[str, Any]) -> ModelVersion:
    return ModelVersion(model=doc["model"], version=int(doc["version"]), digest=doc["digest"],
                        flavor=Flavor(doc["flavor"]), model_file=doc.get("model_file"),
                        entry_script=doc.get("entry_script"), requirements=tuple(doc.get("requirements") or ()),
                        sample=doc.get("sample"), expected=doc.get("expected"), metrics=doc.get("metrics") or {},
                        tags=doc.get("tags") or {}, description=doc.get("description") or "",
                        source=Source(doc.get("source") or "native"), external_ref=doc.get("external_ref"),
                        status=doc.get("status") or "ready", created_at=doc.get("created_at") or "")


def _fetch_files(client: Client, home: Path, path: str, version: ModelVersion, log: Echo) -> Path:
    """The version's files under ``home/runner-files/{digest}`` (downloaded once, checked
    against the version's digest)."""
    dest = Path(home) / "runner-files" / version.digest
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = f"{client.base}{path}"
    headers = {"Authorization": f"Bearer {client.token}"} if client.token else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=120) as r, \
                tempfile.TemporaryFile() as archive:
            if r.status_code != 200:
                raise BuildError(f"downloading the model files from {url} answered {r.status_code}: {r.text[:300]}")
            for chunk in r.iter_content(1024 * 1024):
                archive.write(chunk)
            size = archive.tell()
            archive.seek(0)
            with contextlib.suppress(FileExistsError), atomic_dir(dest) as tmp:
                safe_extract(archive, tmp, MAX_FILES_BYTES)
                if tree_digest(tmp) != version.digest:
                    raise BuildError(f"the model files downloaded from the service do not match digest "
                                     f"{version.digest}; nothing was built")
    except requests.RequestException as e:
        raise BuildError(f"cannot download the model files from {url}: {e}") from None
    log(f"downloaded the model files ({size / 1e6:.1f} MB, digest {version.digest[:12]} checked)")
    return dest


# -- deploy -----------------------------------------------------------------------------


def deploy(client: Client, settings: Settings, work: dict[str, Any], log: Echo,
           cancel: threading.Event) -> dict[str, Any]:
    target = _target(settings, work["instance"])
    image = _image_to_run(target, work, log)
    spec = DeploySpec(deployment_id=work["deployment_id"], model=work["model"], version=int(work["version"]),
                      environment=work["environment"],
                      bundle=Bundle(path=Path("."), python=Path(PYTHON_IN_IMAGE), env_key="", reused_env=True,
                                    image=image),
                      workers=int(work["workers"]), health_timeout_s=float(work["health_timeout_s"]),
                      env=resolve_env(work.get("env") or {}, settings.home), cpu=work.get("cpu"),
                      memory=work.get("memory"), network=work.get("network"))
    rd = target.create(spec, log, cancel)
    running = _running_digest(target, rd, work)
    log(f"deployment {rd.deployment_id} runs {running} at {rd.url}")
    return {"url": rd.url, "port": rd.port, "pid": rd.pid, "container": target.container_name(rd.deployment_id),
            "image": image, "image_digest": running}


def _target(settings: Settings, instance: str) -> DockerTarget:
    target = get_target("docker", settings)
    assert isinstance(target, DockerTarget)
    target.instance = instance  # the service's: its containers, whoever started them
    return target


def _image_to_run(target: DockerTarget, work: dict[str, Any], log: Echo) -> str:
    """The reference to start: the pushed image by digest (pulled when this engine lacks it),
    or, without a registry, the local image whose id is the digest."""
    from docker.errors import APIError, ImageNotFound

    digest, ref = work["image_digest"], work.get("pull")
    if not ref:  # no registry: the build left the image on this engine
        try:
            found = target.client.images.get(work["image"])
        except ImageNotFound:
            raise DeployError(f"image {work['image']} is not on this runner's engine: without pipeline.registry "
                              "the build and deploy stages must run on the same engine") from None
        if found.id != digest:
            raise DeployError(f"image {work['image']} on this engine is {found.id}, not the built {digest}")
        return str(work["image"])
    try:
        target.client.images.get(ref)
        log(f"{ref} is on this engine")
        return str(ref)
    except ImageNotFound:
        pass
    username, password = os.environ.get(work["username_env"]), os.environ.get(work["password_env"])
    auth = {"username": username, "password": password} if username and password else None
    log(f"pulling {ref}")
    try:
        target.client.images.pull(ref, auth_config=auth)
    except (APIError, ImageNotFound) as e:
        message = str(getattr(e, "explanation", None) or e)
        if password:
            message = message.replace(password, "***")
        raise DeployError(f"cannot pull {ref} ({digest}): {message}") from None
    return str(ref)


def _running_digest(target: DockerTarget, rd: RunningDeployment, work: dict[str, Any]) -> str:
    """The digest of what the container runs: the pushed digest when the container's image
    carries it among its repository digests, else the image's content id."""
    container = target.client.containers.get(target.container_name(rd.deployment_id))
    image = target.client.images.get(container.attrs["Image"])
    wanted = work["image_digest"]
    for repo_digest in image.attrs.get("RepoDigests") or []:
        if repo_digest.endswith("@" + wanted):
            return str(wanted)
    return str(image.id)


# -- smoke ------------------------------------------------------------------------------


def smoke(client: Client, settings: Settings, work: dict[str, Any], log: Echo,
          cancel: threading.Event) -> dict[str, Any]:
    checks = SmokeChecks(**work["checks"])
    report = run_smoke(work["url"], work.get("sample"), work.get("expected"), checks, None, log, cancel)
    if report.outcome is Outcome.PASSED:
        return {"passed": True, "summary": f"{len(report.checks)} checks passed from the runner against {work['url']}"}
    try:
        report.raise_for_outcome()
    except ModelcdError as e:
        raise type(e)(f"{e.message} (from the runner)") from None
    return {"passed": False, "summary": str(report.outcome)}


def stop_runner_deployment(settings: Settings, deployment_id: str, instance: str, echo: Echo) -> None:
    """After the service rolled back: stop the release's container on this engine, when it is
    here (the service stopped it already when it reaches the same engine)."""
    target = _target(settings, instance)
    target.delete(RunningDeployment(deployment_id=deployment_id, target="docker", url="", pid=0, port=0,
                                    log_path=target.log_path(deployment_id)))  # idempotent: gone already is fine
    echo(f"container {target.container_name(deployment_id)} is not running on the runner's engine")


STAGES: dict[str, Callable[[Client, Settings, dict[str, Any], Echo, threading.Event], dict[str, Any]]] = {
    "build": build, "deploy": deploy, "smoke": smoke}
