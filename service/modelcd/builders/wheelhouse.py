"""Wheelhouses: every wheel a scoring image needs, resolved and downloaded on the host.

Images are built with no network inside the engine: the builder resolves the model's and the
scoring runtime's requirements into a lock for the image's interpreter and platform
(``uv pip compile --python-version … --python-platform …``), downloads the matching wheels
(``pip download --only-binary=:all: --platform …``) and the Dockerfile installs them with
``--no-index``. A wheelhouse is keyed by the requirements and the image's interpreter, so
every version with the same requirements shares one (and one dependency layer).

Layout under ``home``::

    wheelhouse/{key}/
        requirements.in         what was asked (normalised)
        requirements.lock       what was resolved (pinned, one per line)
        wheels/*.whl
        wheelhouse.json         written last: its presence means "complete"
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from modelcd.builders.bundle import (
    Log,
    check_cancel,
    exclusive_lock,
    find_uv,
    install_error_excerpt,
    now_iso,
    run_streaming,
)
from modelcd.errors import BuildError
from modelcd.fsutil import atomic_dir

MARKER = "wheelhouse.json"
_UV_GLIBC = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)  # manylinux_2_X values uv knows
_NOISE = ("is ignored: it is neither a file nor a directory",)  # pip's complaints about absent find-links


@dataclass(frozen=True)
class ImagePython:
    """The interpreter inside a base image, as far as wheels care."""

    command: str  # e.g. python3
    version: str  # major.minor, e.g. 3.11
    implementation: str  # cp
    machine: str  # x86_64, aarch64
    libc: str  # glibc version, e.g. 2.36 ("" for musl or unknown)

    @property
    def abi(self) -> str:
        return f"{self.implementation}{self.version.replace('.', '')}"

    def pip_platforms(self) -> list[str]:
        """Every platform tag a wheel for this interpreter may carry, newest first."""
        tags: list[str] = []
        if self.libc:
            major, minor = (int(p) for p in self.libc.split(".")[:2])
            tags += [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 4, -1)]
            tags += [f"manylinux{alias}_{self.machine}" for alias in ("2014", "2010", "1")]
        tags.append(f"linux_{self.machine}")
        return tags

    def uv_platform(self) -> str:
        """The closest ``--python-platform`` value uv knows."""
        if self.libc and self.machine in ("x86_64", "aarch64"):
            minor = int(self.libc.split(".")[1])
            known = [m for m in _UV_GLIBC if m <= minor]
            if known:
                return f"{self.machine}-manylinux_2_{known[-1]}"
        return "linux"


@dataclass(frozen=True)
class Wheelhouse:
    path: Path
    key: str
    reused: bool

    @property
    def lock(self) -> Path:
        return self.path / "requirements.lock"

    @property
    def wheels(self) -> Path:
        return self.path / "wheels"


def wheelhouse_key(requirements: Sequence[str], python: ImagePython) -> str:
    doc = json.dumps({"requirements": sorted(requirements), "python": asdict(python)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def ensure_wheelhouse(home: Path, requirements: Sequence[str], python: ImagePython, log: Log,
                      cancel: threading.Event) -> Wheelhouse:
    """Return the complete wheelhouse for ``requirements`` on ``python``, filling it first if needed.

    Two builders of one key serialise on a lock; the loser finds it complete. Raises
    BuildError naming the requirement that cannot be resolved or has no wheel.
    """
    key = wheelhouse_key(requirements, python)
    final = Path(home) / "wheelhouse" / key
    if (final / MARKER).is_file():
        log(f"reusing wheelhouse {key[:12]}")
        return Wheelhouse(final, key, reused=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(home), f"wheelhouse-{key}", log, cancel):
        if (final / MARKER).is_file():
            log(f"reusing wheelhouse {key[:12]} (filled meanwhile)")
            return Wheelhouse(final, key, reused=True)
        shutil.rmtree(final, ignore_errors=True)
        started = time.monotonic()
        with atomic_dir(final) as tmp:
            (tmp / "requirements.in").write_text("".join(f"{r}\n" for r in requirements))
            _lock(tmp, requirements, python, log, cancel)
            _download(tmp, python, log, cancel)
            meta = {"key": key, "python": asdict(python), "requirements": list(requirements), "created_at": now_iso()}
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            check_cancel(cancel)
    count = len(list((final / "wheels").glob("*.whl")))
    log(f"wheelhouse {key[:12]} ready: {count} wheels in {time.monotonic() - started:.1f}s")
    return Wheelhouse(final, key, reused=False)


def _lock(tmp: Path, requirements: Sequence[str], python: ImagePython, log: Log, cancel: threading.Event) -> None:
    uv = find_uv()
    if uv is None:
        raise BuildError("uv is needed to resolve requirements for an image; install it with `pip install uv`")
    log(f"resolving {len(requirements)} requirements for Python {python.version} on {python.uv_platform()}")
    argv = [uv, "pip", "compile", str(tmp / "requirements.in"), "--python-version", python.version,
            "--python-platform", python.uv_platform(), "--no-header", "--no-annotate", "--quiet",
            "--output-file", str(tmp / "requirements.lock")]
    rc, tail = run_streaming(argv, log, cancel)
    if rc != 0:
        raise BuildError(_blame("cannot resolve the requirements", tail, requirements, rc), field="requirements")


def _download(tmp: Path, python: ImagePython, log: Log, cancel: threading.Event) -> None:
    """Download the locked wheels for the image's platform; build the few that only ship
    sources on the host when the host's interpreter matches the image's."""
    wheels = tmp / "wheels"
    wheels.mkdir()
    platforms = [arg for tag in python.pip_platforms() for arg in ("--platform", tag)]
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", "--python-version", python.version, "--implementation", python.implementation,
            "--abi", python.abi, "--abi", "abi3", "--abi", "none", *platforms,
            "--requirement", str(tmp / "requirements.lock"), "--dest", str(wheels)]
    log(f"downloading wheels for {python.abi} {python.machine}")
    rc, tail = run_streaming(argv, _quiet(log), cancel)
    if rc == 0:
        return
    pinned = [ln.strip() for ln in (tmp / "requirements.lock").read_text().splitlines() if ln.strip()]
    if not _host_matches(python):
        raise BuildError(_blame("some requirements publish no wheel for the image's platform", tail, pinned, rc)
                         + f"\nthe host ({_host_tag()}) cannot build them for the image ({python.abi} "
                         f"{python.machine}); use a base image with the host's Python or pin versions with wheels",
                         field="requirements")
    log("some requirements have no wheel for the image; building them on the host")
    argv = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
            "--requirement", str(tmp / "requirements.lock"), "--wheel-dir", str(wheels)]
    rc, tail = run_streaming(argv, _quiet(log), cancel)
    if rc != 0:
        raise BuildError(_blame("cannot build wheels for the requirements", tail, pinned, rc), field="requirements")


def _quiet(log: Log) -> Log:
    def write(line: str) -> None:
        if not any(noise in line for noise in _NOISE):
            log(line)

    return write


def _host_matches(python: ImagePython) -> bool:
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    return host == python.version and platform.machine() == python.machine and sys.implementation.name == "cpython"


def _host_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor} {platform.machine()}"


def _blame(what: str, tail: Sequence[str], requirements: Sequence[str], rc: int) -> str:
    excerpt = install_error_excerpt([ln for ln in tail if not any(n in ln for n in _NOISE)])
    lowered = excerpt.lower()
    named = [r for r in requirements if _name(r) and _name(r) in lowered]
    blame = f" (requirement {', '.join(repr(r) for r in named)})" if named else ""
    return f"{what}{blame}: exit code {rc}\n{excerpt}"


def _name(requirement: str) -> str:
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "._-"):
            return requirement[:i].lower()
    return requirement.lower()
