"""Build stage of the ``docker`` target: a scoring image built with the docker SDK.

The requirements are resolved into a lock and its wheels fetched into a wheelhouse on the
host; the virtualenv of that lock is an image of its own, made once per lock and base image
from the wheelhouse with no network (``builders/image_deps.py``: on the host when it has the
image's Python, else inside the engine). A version's image is ``FROM`` it, and its build
context holds the same files as a ``process`` bundle (``model/``, ``runtime/``,
``scoring.json``) and a Dockerfile rendered from ``pipeline_templates/docker/Dockerfile.j2``;
the engine builds it with ``network_mode=none``. Layers go base → dependencies → runtime →
model, and the context's tar is deterministic (sorted, fixed owners, modes and times), so a new
version with unchanged requirements reuses every layer but the model's.

Registry-supplied strings never reach the Dockerfile: the model's name, version, digest and
description travel only as labels set through the API. Layout under ``home``::

    images/{model}/{version}-{digest12}/    build context (model/, runtime/, scoring.json,
                                            requirements.lock, Dockerfile, bundle.json)
    images/.python-{image id}.json          what the interpreter of a base image is (and its path)
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from modelcd.builders.base import Builder, BuildSpec
from modelcd.builders.bundle import (
    Log,
    check_cancel,
    check_files,
    check_model_python,
    check_name,
    normalise_requirements,
    now_iso,
    runtime_requirements,
    write_scoring_files,
)
from modelcd.builders.engine_build import add, add_tree, api_message, build
from modelcd.builders.image_deps import check_mode, ensure_dependencies_image
from modelcd.builders.wheelhouse import ImagePython, ensure_wheelhouse
from modelcd.docker_engine import check_reference, connect, repository_component
from modelcd.domain import Bundle, Flavor, ModelVersion
from modelcd.errors import BuildError
from modelcd.fsutil import atomic_dir, write_atomic
from modelcd.templating import render

ROOT = "/opt/modelcd"  # where everything lives inside the image
PORT = 8080  # the port the image serves on unless told otherwise (MODELCD_SCORING_PORT)
UID = 10001  # unprivileged user the scoring service runs as
PYTHON_IN_IMAGE = f"{ROOT}/venv/bin/python"
MARKER = "bundle.json"
LABEL_PREFIX = "io.modelcd."
_PROBE = ("import json, os, platform, sys, venv, ensurepip; "
          "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'implementation': sys.implementation.name, "
          "'machine': platform.machine(), 'libc': platform.libc_ver()[1] if platform.libc_ver()[0] == 'glibc' "
          "else '', 'executable': os.path.realpath(sys.executable)}))")


@dataclass(frozen=True)
class ImageOptions:
    """What the image build needs from the settings."""

    base_image: str = "python:3.11-slim"
    repository: str = "modelcd"
    docker_host: str | None = None
    registry: str | None = None
    registry_username: str | None = None
    registry_password: str | None = field(default=None, repr=False)
    build_timeout_s: float = 1800.0
    no_cache: bool = False  # build every layer again (a cold build), e.g. to pick up a changed base image
    # how the dependencies image's venv is made (builders/image_deps.py): auto (on the host when
    # it has the image's Python, else inside the engine), host, engine (uv in the engine) or pip
    dependencies: str = "auto"

    def __post_init__(self) -> None:
        check_mode(self.dependencies)

    @classmethod
    def from_settings(cls, settings: Any) -> ImageOptions:
        return cls(base_image=settings.docker_base_image, repository=settings.docker_repository,
                   docker_host=settings.docker_host, registry=settings.docker_registry,
                   registry_username=settings.docker_registry_username,
                   registry_password=settings.docker_registry_password,
                   build_timeout_s=settings.docker_build_timeout_s, dependencies=settings.docker_dependencies)


def image_tag(options: ImageOptions, version: ModelVersion) -> str:
    """``{repository}/{model}:{version}-{digest12}`` (the model's name made a valid component)."""
    try:
        component = repository_component(version.model)
    except ValueError as e:
        raise BuildError(str(e), field="model") from e
    return f"{options.repository}/{component}:{version.version}-{version.digest12}"


LABEL_KEYS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.description",
    "org.opencontainers.image.vendor",
    "org.opencontainers.image.base.name",
    f"{LABEL_PREFIX}model",
    f"{LABEL_PREFIX}version",
    f"{LABEL_PREFIX}digest",
    f"{LABEL_PREFIX}flavor",
    f"{LABEL_PREFIX}source",
    f"{LABEL_PREFIX}external-ref",
)


def label_arg(key: str) -> str:
    """The build argument that carries label ``key``'s value."""
    return "LABEL_" + re.sub(r"[^A-Za-z0-9]", "_", key).upper()


def image_labels(version: ModelVersion, base_image: str) -> dict[str, str]:
    """OCI labels plus modelcd's own (every key of LABEL_KEYS). The values are data: they
    reach the engine as build arguments, never as Dockerfile text."""
    values = [version.model, str(version.version), version.digest, now_iso(),
              (version.description or f"{version.model} scoring service")[:512], "modelcd", base_image,
              version.model, str(version.version), version.digest, str(version.flavor), str(version.source),
              (version.external_ref or "")[:512]]
    return dict(zip(LABEL_KEYS, values, strict=True))


def render_dockerfile(dependencies_image: str) -> str:
    check_reference(dependencies_image, "docker_repository", BuildError)
    labels = [{"key": key, "arg": label_arg(key)} for key in LABEL_KEYS]
    return render("docker/Dockerfile.j2", {"generator": "modelcd", "dependencies_image": dependencies_image,
                                           "labels": labels, "root": ROOT, "port": PORT, "uid": UID})


def build_image(home: Path, version: ModelVersion, files_dir: Path, options: ImageOptions, log: Log,
                cancel: threading.Event) -> Bundle:
    """Build (or find) the scoring image of ``version`` and return its bundle.

    Raises BuildError naming the cause (engine unreachable, base image missing, entry script
    that does not compile, requirement that cannot be resolved or has no wheel, a failing
    build step) and Cancelled when ``cancel`` is set.
    """
    home = Path(home).absolute()
    check_cancel(cancel)
    check_name(version.model, "model name")
    check_files(version, Path(files_dir))
    tag = image_tag(options, version)
    client = connect(options.docker_host, BuildError)
    try:
        base = _ensure_base(client, options.base_image, log)
        python, executable = _probe_python(client, home, base, options.base_image, log)
        if version.flavor == Flavor.PYFUNC:
            check_model_python(Path(files_dir), version, python.version, f"the base image {options.base_image}")
        requirements = [*normalise_requirements(version.requirements), *runtime_requirements()]
        wheelhouse = ensure_wheelhouse(home, normalise_requirements(requirements), python, log, cancel)
        dependencies = ensure_dependencies_image(client, home, base, python, executable, wheelhouse, options, log,
                                                 cancel)
        context = _ensure_context(home, version, Path(files_dir), cancel)
        _write_if_changed(context / "Dockerfile", render_dockerfile(dependencies))
        _write_if_changed(context / "requirements.lock", wheelhouse.lock.read_text())
        buildargs = {label_arg(key): value for key, value in image_labels(version, options.base_image).items()}
        image_id = build(client, lambda out: context_tar(context, out), tag, buildargs, options.docker_host,
                         options.build_timeout_s, options.no_cache, log, cancel)
        ref, digest = tag, None
        if options.registry:
            ref, digest = push_image(client, image_id, tag, options, log)
    finally:
        client.close()
    meta = {"model": version.model, "version": version.version, "digest": version.digest, "image": ref,
            "image_id": image_id, "python": PYTHON_IN_IMAGE, "env_key": wheelhouse.key,
            "base_image": options.base_image, "created_at": now_iso()}
    _write_if_changed(context / MARKER, json.dumps(meta, indent=2) + "\n")
    return Bundle(path=context, python=Path(PYTHON_IN_IMAGE), env_key=wheelhouse.key, reused_env=wheelhouse.reused,
                  image=ref, image_id=image_id, image_digest=digest)


class ImageBuilder(Builder):
    """The ``docker`` target's builder: ``build_image`` under ``home`` with ``options``."""

    def __init__(self, home: Path, options: ImageOptions) -> None:
        self.home = home
        self.options = options

    def build(self, spec: BuildSpec, log: Log, cancel: threading.Event) -> Bundle:
        return build_image(self.home, spec.version, spec.files_dir, self.options, log, cancel)


# -- base image --------------------------------------------------------------------------


def _ensure_base(client: Any, base_image: str, log: Log) -> Any:
    from docker.errors import APIError, ImageNotFound

    check_reference(base_image, "docker_base_image", BuildError)
    try:
        return client.images.get(base_image)
    except ImageNotFound:
        pass
    log(f"base image {base_image} is not on the engine; pulling it")
    try:
        return client.images.pull(base_image)
    except (APIError, ImageNotFound) as e:
        raise BuildError(f"base image {base_image} is not on the engine and cannot be pulled "
                         f"({api_message(e)}); build one offline with `modelcd base-image build` and set "
                         "docker_base_image (MODELCD_DOCKER_BASE_IMAGE) to its tag",
                         field="docker_base_image") from e


def _probe_python(client: Any, home: Path, base: Any, base_image: str, log: Log) -> tuple[ImagePython, str]:
    """What interpreter the base image has, and its path (cached per image id)."""
    from docker.errors import ContainerError, DockerException

    cache = home / "images" / f".python-{base.id.split(':')[-1][:24]}.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        known = json.loads(cache.read_text())
        executable = str(known.pop("executable"))
        return ImagePython(**known), executable
    problems = []
    for command in ("python3", "python"):
        try:
            out = client.containers.run(base.id, [command, "-c", _PROBE], remove=True, network_mode="none",
                                        stdout=True, stderr=True, entrypoint=[])
        except ContainerError as e:
            problems.append(f"{command}: {api_message(e)}")
            continue
        except DockerException as e:
            raise BuildError(f"cannot run the base image {base_image}: {api_message(e)}",
                             field="docker_base_image") from e
        info = json.loads(out.decode().strip().splitlines()[-1])
        impl = {"cpython": "cp", "pypy": "pp"}.get(info["implementation"], info["implementation"])
        python = ImagePython(command=command, version=info["version"], implementation=impl,
                             machine=info["machine"], libc=info["libc"])
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps({**asdict(python), "executable": info["executable"]}))
        log(f"base image {base_image}: {command} {python.version} ({python.abi}, {python.machine}, "
            f"glibc {python.libc or 'none'}) at {info['executable']}")
        return python, str(info["executable"])
    raise BuildError(f"base image {base_image} has no usable Python with venv and ensurepip "
                     f"({'; '.join(problems)}); use an image with python3 and python3-venv, e.g. python:3.11-slim "
                     "or one from `modelcd base-image build`", field="docker_base_image")


# -- context -----------------------------------------------------------------------------


def _ensure_context(home: Path, version: ModelVersion, files_dir: Path, cancel: threading.Event) -> Path:
    """The version's build context folder with its scoring files (written once, temp + rename)."""
    final = home / "images" / version.model / f"{version.version}-{version.digest12}"
    if (final / "scoring.json").is_file():
        return final
    try:
        with atomic_dir(final) as tmp:
            write_scoring_files(tmp, version, files_dir, cancel)
    except FileExistsError as e:
        if not (final / "scoring.json").is_file():  # not a concurrent twin: a real failure
            raise BuildError(f"cannot write the build context {final}: {e}") from e
    except OSError as e:
        raise BuildError(f"cannot write the build context {final}: {e}") from e
    return final


def _write_if_changed(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    write_atomic(path, text)


def context_tar(context: Path, out: IO[bytes]) -> None:
    """Write the version's build context (Dockerfile, runtime, model) as a tar the engine's
    layer cache can rely on: sorted entries, root-owned, fixed modes and a fixed time, so equal
    content gives equal layers. The dependencies are in the image it builds ``FROM``."""
    with tarfile.open(fileobj=out, mode="w|") as tar:
        add(tar, context / "Dockerfile", "Dockerfile")
        add_tree(tar, context / "runtime", "runtime")
        add(tar, context, "app")
        add(tar, context / "scoring.json", "app/scoring.json")
        add_tree(tar, context / "model", "app/model")


# -- push --------------------------------------------------------------------------------


def push_image(client: Any, image_id: str, tag: str, options: ImageOptions, log: Log) -> tuple[str, str]:
    """Tag ``image_id`` into ``options.registry`` and push it; return the pushed reference and
    the manifest digest the registry answered (``sha256:…``).

    Credentials go to the engine in the API's auth header only, never into the log."""
    from docker.errors import APIError

    assert options.registry is not None
    check_reference(options.registry, "docker_registry", BuildError)
    repo, _, version_tag = f"{options.registry}/{tag}".rpartition(":")
    auth = None
    if options.registry_username:
        auth = {"username": options.registry_username, "password": options.registry_password or ""}
    log(f"pushing {repo}:{version_tag}")
    try:
        client.api.tag(image_id, repo, version_tag)
        error, digest = None, None
        for chunk in client.api.push(repo, tag=version_tag, stream=True, decode=True, auth_config=auth):
            if "error" in chunk:
                error = str(chunk["error"])
            elif isinstance(chunk.get("aux"), dict) and chunk["aux"].get("Digest"):
                digest = str(chunk["aux"]["Digest"])
            elif chunk.get("status") and "id" not in chunk:
                log(str(chunk["status"]))
    except APIError as e:
        error = api_message(e)
    if error:
        secret = options.registry_password
        if secret:
            error = error.replace(secret, "***")
        raise BuildError(f"push of {repo}:{version_tag} to {options.registry} failed: {error}",
                         field="docker_registry")
    if not digest:
        raise BuildError(f"push of {repo}:{version_tag} to {options.registry} answered no digest",
                         field="docker_registry")
    log(f"pushed {repo}:{version_tag} ({digest})")
    return f"{repo}:{version_tag}", digest


__all__ = ["PORT", "ROOT", "ImageOptions", "build_image", "context_tar", "image_labels", "image_tag", "push_image",
           "render_dockerfile"]
