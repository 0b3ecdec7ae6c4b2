"""``modelcd base-image build``: a Python base image made offline from Debian packages.

Where no image can be pulled, ``mmdebstrap`` builds a minimal Debian root file system with
``python3`` and ``python3-venv`` from the configured apt mirror and ``docker import`` turns it
into an image (``modelcd/python:3.11-bookworm`` by default). Nothing runs inside the engine;
only the Debian mirror is needed.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from modelcd.builders.bundle import Log, run_streaming
from modelcd.docker_engine import check_reference, connect
from modelcd.errors import BuildError

DEFAULT_SUITE = "bookworm"
PYTHON_BY_SUITE = {"bookworm": "3.11", "trixie": "3.13"}
PACKAGES = ("python3", "python3-venv", "ca-certificates")
_SUITE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


def default_tag(suite: str = DEFAULT_SUITE) -> str:
    return f"modelcd/python:{PYTHON_BY_SUITE.get(suite, 'debian')}-{suite}"


def build_base_image(tag: str | None, suite: str, mirror: str | None, docker_host: str | None, log: Log,
                     cancel: threading.Event, extra_packages: tuple[str, ...] = ()) -> str:
    """Build the base image; return its id. Raises BuildError naming what is missing."""
    if not suite or not set(suite) <= _SUITE_CHARS:
        raise BuildError(f"suite {suite!r} is not a Debian suite name (e.g. bookworm)", field="suite")
    for package in extra_packages:
        if not package or not all(c.isalnum() or c in "+-.:" for c in package):
            raise BuildError(f"package {package!r} is not a Debian package name", field="include")
    tag = check_reference(tag or default_tag(suite), "tag", BuildError)
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise BuildError("mmdebstrap is not installed; on Debian or Ubuntu: apt-get install mmdebstrap",
                         field="mmdebstrap")
    client = connect(docker_host, BuildError)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="modelcd-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        argv = [mmdebstrap, "--variant=minbase", f"--include={','.join((*PACKAGES, *extra_packages))}",
                "--aptopt=Acquire::Retries 3", "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
                suite, str(rootfs)]
        if mirror:
            argv.append(mirror)
        log(f"bootstrapping Debian {suite} with {', '.join((*PACKAGES, *extra_packages))}")
        rc, tail = run_streaming(argv, log, cancel)
        if rc != 0:
            raise BuildError(f"mmdebstrap failed with exit code {rc}:\n" + "\n".join(tail[-10:]), field="mmdebstrap")
        repository, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
        log(f"importing {rootfs.stat().st_size / 1e6:.0f} MB root file system as {tag}")
        changes = ["ENV LANG=C.UTF-8", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   'CMD ["python3"]', f"LABEL org.opencontainers.image.title={repository}",
                   "LABEL org.opencontainers.image.vendor=modelcd",
                   f"LABEL org.opencontainers.image.description=Debian-{suite}-python3-from-mmdebstrap"]
        try:
            client.api.import_image_from_file(str(rootfs), repository=repository, tag=version, changes=changes)
            image = client.images.get(tag)
        except Exception as e:  # docker.errors.APIError and friends
            raise BuildError(f"docker import of {tag} failed: {e}") from e
        finally:
            client.close()
    log(f"built {tag} ({image.id[:19]}) in {time.monotonic() - started:.0f}s")
    return str(image.id)
