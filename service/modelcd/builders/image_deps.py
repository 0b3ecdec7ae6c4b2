"""The dependencies image of the ``docker`` target: a base image plus the virtualenv of one
resolved lock, built once per (lock, base image) and tagged; every version image of that lock
is ``FROM`` it and adds only the scoring runtime and the model, so a new version sends a small
context and a cold build pays for the dependencies once per lock.

Two ways to make it (``ImageOptions.dependencies``):

- ``host`` (``auto`` picks it when it can): the host has CPython of the image's major.minor
  on the image's machine and the image has glibc. The venv is built on the host from the
  wheelhouse (``uv venv --relocatable``, ``uv pip install --no-index`` for the image's
  platform), byte-compiled with unchecked-hash ``.pyc`` files (valid whatever the files'
  times: the layer's are fixed at 0, which would make timestamp ``.pyc`` files stale), its
  ``bin/python`` pointed at the image's interpreter, and handed to the engine as one layer on
  the base image (``docker load``: no build context, no container, no commit of a diff).
- ``engine`` (``auto``'s fallback): a two-stage build inside the engine with no network, the
  host's uv binary in the build stage installing from the wheelhouse (``pip`` when the image
  cannot run it; ``pip`` also selects the in-engine pip install of modelcd before this module,
  kept to measure against).

Either way the image holds ``/opt/modelcd/venv`` and ``/opt/modelcd/requirements.lock``,
owned by root, and no wheel.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from modelcd.builders import engine_build
from modelcd.builders.bundle import (
    Log,
    check_cancel,
    exclusive_lock,
    find_python,
    find_uv,
    install_error_excerpt,
    run_streaming,
)
from modelcd.builders.wheelhouse import ImagePython, Wheelhouse
from modelcd.errors import BuildError
from modelcd.fsutil import scratch_dir, temp_file
from modelcd.templating import render

if TYPE_CHECKING:
    from modelcd.builders.image import ImageOptions

MODES = ("auto", "host", "engine", "pip")
RECIPE = "1"  # part of the key: a change of how the venv is made gives new dependencies images
KEY_LABEL = "io.modelcd.dependencies"
SKIP_COMPILE = r"/tests?/"  # compileall -x: the test suites packages ship (a third of scipy's files) never serve


def dependencies_key(wheelhouse: Wheelhouse, base_id: str) -> str:
    return key_of(wheelhouse.key, base_id)


def key_of(lock_key: str, base_id: str) -> str:
    """The dependencies image's key (its ``KEY_LABEL``) of a lock's key on a base image's id."""
    return hashlib.sha256(f"{lock_key}\n{base_id}\n{RECIPE}".encode()).hexdigest()


def dependencies_tag(repository: str, python: ImagePython, key: str) -> str:
    """``{repository}-deps:{abi}-{key24}`` (apart from the model images, whatever a model is named)."""
    return f"{repository}-deps:{python.abi}-{key[:24]}"


def host_interpreter(python: ImagePython) -> Path | None:
    """A host CPython that can build the image's venv: same major.minor (so the same bytecode
    format), same machine, and an image with glibc (its wheels are the ones the lock names)."""
    if not python.libc or python.implementation != "cp" or platform.machine() != python.machine:
        return None
    if sys.implementation.name == "cpython" and f"{sys.version_info[0]}.{sys.version_info[1]}" == python.version:
        return Path(sys.executable)
    return find_python(python.version)


def plan(mode: str, python: ImagePython) -> tuple[str, Path | None, str]:
    """(how: host, uv or pip; the host interpreter for ``host``; why, for the log)."""
    check_mode(mode)
    if mode == "pip":
        return "pip", None, "with pip inside the engine (as asked)"
    has_uv = find_uv() is not None
    interpreter = host_interpreter(python) if has_uv and mode in ("auto", "host") else None
    if interpreter is not None:
        return "host", interpreter, f"on the host with {interpreter} (the image's Python is {python.version})"
    if mode == "host":
        raise BuildError(f"dependencies 'host' needs uv and CPython {python.version} on this host "
                         f"({platform.machine()}) for an image with glibc on {python.machine} (the base image has "
                         f"{python.abi}, glibc {python.libc or 'none'}); install python{python.version} and uv "
                         "(`pip install uv`) here or use dependencies 'auto'", field="dependencies")
    runs_uv = has_uv and bool(python.libc) and platform.machine() == python.machine
    why = f"no host Python {python.version} with uv" if mode == "auto" else "as asked"
    return ("uv", None, f"with uv inside the engine ({why})") if runs_uv else \
        ("pip", None, f"with pip inside the engine ({why}; the image cannot run the host's uv)")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BuildError(f"dependencies {mode!r} is not one of {', '.join(MODES)}", field="dependencies")
    return mode


def ensure_dependencies_image(client: Any, home: Path, base: Any, python: ImagePython, executable: str,
                              wheelhouse: Wheelhouse, options: ImageOptions, log: Log,
                              cancel: threading.Event) -> str:
    """The tag of the dependencies image of ``wheelhouse`` on ``base``, made first if the engine
    lacks it (or ``options.no_cache``). Two builders of one key serialise on a lock."""
    key = dependencies_key(wheelhouse, base.id)
    tag = dependencies_tag(options.repository, python, key)
    if not options.no_cache and _has(client, tag, key):
        log(f"reusing dependencies image {tag}")
        return tag
    with exclusive_lock(home, f"image-deps-{key}", log, cancel):
        if not options.no_cache and _has(client, tag, key):
            log(f"reusing dependencies image {tag} (built meanwhile)")
            return tag
        how, interpreter, why = plan(options.dependencies, python)
        log(f"building dependencies image {tag}: the virtualenv of {wheelhouse.key[:12]} {why}")
        started = time.monotonic()
        if how == "host":
            assert interpreter is not None
            _from_host(client, home, base, python, executable, wheelhouse, interpreter, tag, key, log, cancel)
        else:
            _in_engine(client, how, python, wheelhouse, options, tag, key, log, cancel)
        log(f"dependencies image {tag} ready in {time.monotonic() - started:.1f}s")
    return tag


def _has(client: Any, tag: str, key: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        return (client.images.get(tag).labels or {}).get(KEY_LABEL) == key
    except ImageNotFound:
        return False


# -- on the host ---------------------------------------------------------------------------


def _from_host(client: Any, home: Path, base: Any, python: ImagePython, executable: str, wheelhouse: Wheelhouse,
               interpreter: Path, tag: str, key: str, log: Log, cancel: threading.Event) -> None:
    images = home / "images"
    with scratch_dir(images, "dependencies") as scratch:
        venv = scratch / "venv"
        host_venv(venv, wheelhouse, python, interpreter, log, cancel)
        retarget_venv(venv, executable)
        check_cancel(cancel)
        with temp_file(images, "dependencies.tar") as archive_path, open(archive_path, "w+b") as archive:
            write_image_archive(archive, base, venv, wheelhouse.lock, tag, key, cancel)
            log(f"loading the venv into the engine as a layer on {base.short_id} ({archive.tell() / 1e6:.0f} MB)")
            archive.seek(0)
            _load(client, archive, tag)


def host_venv(venv: Path, wheelhouse: Wheelhouse, python: ImagePython, interpreter: Path, log: Log,
              cancel: threading.Event) -> None:
    """Install the lock into a new venv at ``venv`` from the wheelhouse only, with the wheels
    of the image's platform, then byte-compile it (unchecked-hash, all cores)."""
    uv = find_uv()
    if uv is None:
        raise BuildError("uv is needed to build an image's environment on the host; install it with `pip install uv`")
    quiet = ["--quiet", "--no-config"]  # what a uv.toml on the host says (an index, a cache) has no say here
    steps = [
        ("create the virtualenv", [uv, "venv", *quiet, "--relocatable", "--python", str(interpreter), str(venv)]),
        ("install the locked requirements from the wheelhouse",
         [uv, "pip", "install", *quiet, "--python", str(venv / "bin" / "python"), "--no-index", "--find-links",
          str(wheelhouse.wheels), "--python-platform", python.uv_platform(), "--requirement", str(wheelhouse.lock)]),
    ]
    for what, argv in steps:
        rc, tail = run_streaming(argv, log, cancel)
        if rc != 0:
            raise BuildError(f"cannot {what} on the host (exit code {rc}):\n{install_error_excerpt(tail)}",
                             field="requirements")
    site = venv / "lib" / f"python{python.version}" / "site-packages"
    log(f"compiling the bytecode of {site.relative_to(venv)} (unchecked-hash; packages' tests left as source)")
    rc, tail = run_streaming([str(venv / "bin" / "python"), "-m", "compileall", "-q", "-j", "0", "-x", SKIP_COMPILE,
                              "--invalidation-mode", "unchecked-hash", str(site)], log, cancel)
    if rc != 0:  # a file that does not compile (say, a Python 2 test) is left as source, as pip does
        log(f"compileall: some files were left uncompiled (exit code {rc})")


def retarget_venv(venv: Path, executable: str) -> None:
    """Make the host-built venv the image's: ``bin/python`` → the image's interpreter and
    ``pyvenv.cfg``'s ``home`` its folder (the scripts of a relocatable venv find their python
    next to them)."""
    python = venv / "bin" / "python"
    python.unlink()
    python.symlink_to(executable)
    cfg = venv / "pyvenv.cfg"
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith(("home", "version_info", "uv "))]
    cfg.write_text("\n".join([f"home = {os.path.dirname(executable)}", *lines]) + "\n")
    (venv / "CACHEDIR.TAG").unlink(missing_ok=True)


def write_image_archive(out: IO[bytes], base: Any, venv: Path, lock: Path, tag: str, key: str,
                        cancel: threading.Event) -> None:
    """A ``docker save`` archive of one image: ``base``'s layers (named, not included: the
    engine has them) plus one layer holding ``/opt/modelcd/venv`` and the lock, written in one
    pass (the layer's header is filled in once its size is known)."""
    from modelcd.builders.image import ROOT

    start = out.tell()
    out.write(b"\0" * tarfile.BLOCKSIZE)  # the header of layer.tar, written last
    digest = _Hashing(out)
    with tarfile.open(fileobj=digest, mode="w|", format=tarfile.PAX_FORMAT) as layer:  # type: ignore[call-overload]
        parts = ROOT.strip("/").split("/")
        for i in range(len(parts)):
            folder = tarfile.TarInfo("/".join(parts[:i + 1]))
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(folder)
        engine_build.add(layer, lock, f"{ROOT.strip('/')}/requirements.lock")
        check_cancel(cancel)
        engine_build.add_tree(layer, venv, f"{ROOT.strip('/')}/venv", links=True)
        check_cancel(cancel)
    size = digest.size
    out.write(b"\0" * (-size % tarfile.BLOCKSIZE))
    attrs = base.attrs
    config = dict(attrs.get("Config") or {})
    config["Labels"] = {**(config.get("Labels") or {}), KEY_LABEL: key}
    image_config = json.dumps({
        "architecture": attrs.get("Architecture"), "os": attrs.get("Os") or "linux", "config": config,
        "created": "1970-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": [*attrs["RootFS"]["Layers"], f"sha256:{digest.hexdigest()}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"modelcd: {ROOT}/venv built on the host"}],
    }, sort_keys=True).encode()
    name = hashlib.sha256(image_config).hexdigest() + ".json"
    base_layers = [f"base-{i}/layer.tar" for i in range(len(attrs["RootFS"]["Layers"]))]  # present on the engine
    manifest = json.dumps([{"Config": name, "RepoTags": [tag], "Layers": [*base_layers, "layer.tar"]}]).encode()
    with tarfile.open(fileobj=out, mode="w|") as tail:
        for arcname, data in ((name, image_config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tail.addfile(info, io.BytesIO(data))
    end = out.tell()
    header = tarfile.TarInfo("layer.tar")
    header.size = size
    out.seek(start)
    out.write(header.tobuf(format=tarfile.USTAR_FORMAT))
    out.seek(end)


class _Hashing:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def _load(client: Any, archive: IO[bytes], tag: str) -> None:
    from docker.errors import DockerException

    try:
        out = list(client.api.load_image(archive))
    except DockerException as e:
        raise BuildError(f"the engine refused the dependencies image {tag}: {engine_build.api_message(e)}") from e
    errors = [str(chunk.get("error") or chunk.get("errorDetail")) for chunk in out
              if isinstance(chunk, dict) and (chunk.get("error") or chunk.get("errorDetail"))]
    if errors:
        raise BuildError(f"the engine refused the dependencies image {tag}: {'; '.join(errors)}")


# -- inside the engine -------------------------------------------------------------------------


def _in_engine(client: Any, how: str, python: ImagePython, wheelhouse: Wheelhouse, options: ImageOptions,
               tag: str, key: str, log: Log, cancel: threading.Event) -> None:
    from modelcd.builders.image import ROOT

    dockerfile = render("docker/Dockerfile.deps.j2", {"generator": "modelcd", "base_image": options.base_image,
                                                      "python": python.command, "root": ROOT, "installer": how,
                                                      "key_label": KEY_LABEL, "skip_compile": SKIP_COMPILE})
    uv = find_uv() if how == "uv" else None

    def write_context(out: IO[bytes]) -> None:
        with tarfile.open(fileobj=out, mode="w|") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile.encode())
            tar.addfile(info, io.BytesIO(dockerfile.encode()))
            engine_build.add(tar, wheelhouse.lock, "requirements.lock")
            if uv is not None:
                engine_build.add(tar, Path(uv), "uv")
            engine_build.add_tree(tar, wheelhouse.wheels, "wheels")

    engine_build.build(client, write_context, tag, {"DEPENDENCIES_KEY": key}, options.docker_host,
                       options.build_timeout_s, options.no_cache, log, cancel)


__all__ = ["MODES", "check_mode", "dependencies_key", "dependencies_tag", "ensure_dependencies_image",
           "host_interpreter", "plan"]
