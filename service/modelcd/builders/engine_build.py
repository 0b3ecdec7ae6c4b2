"""Talking to the engine's classic builder for the ``docker`` target: deterministic build
contexts (sorted entries, root-owned, fixed modes and a fixed time, so equal content gives equal
layers), a build streamed into the log that stays cancellable, and the engine's error text."""

from __future__ import annotations

import os
import re
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty, Queue
from typing import IO, Any

from modelcd.builders.bundle import Log
from modelcd.docker_engine import engine_url
from modelcd.errors import BuildError, Cancelled

_STEP = re.compile(r"^Step (\d+)/(\d+) :")
_POLL_S = 0.1


def add_tree(tar: tarfile.TarFile, root: Path, arcroot: str, links: bool = False) -> None:
    """``root`` and everything under it as ``arcroot/…``, sorted; symbolic links only with ``links``."""
    add(tar, root, arcroot)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for name in [*sorted(dirnames), *sorted(filenames)]:
            add(tar, Path(dirpath) / name, f"{arcroot}/{(rel / name).as_posix()}".replace("/./", "/"), links)


def add(tar: tarfile.TarFile, path: Path, arcname: str, links: bool = False) -> None:
    info = tar.gettarinfo(str(path), arcname=arcname)
    if not (info.isfile() or info.isdir() or (links and info.issym())):
        return  # links and devices never enter an image from a model (the registry refuses them on upload too)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if not info.issym():
        info.mode = 0o755 if info.isdir() or (info.mode & 0o111) else 0o644
    if info.isfile():
        with open(path, "rb") as fh:
            tar.addfile(info, fh)
    else:
        tar.addfile(info)


def build(client: Any, write_context: Callable[[IO[bytes]], None], tag: str, buildargs: dict[str, str],
          docker_host: str | None, timeout_s: float, no_cache: bool, log: Log, cancel: threading.Event) -> str:
    """Send the context ``write_context`` writes, stream the engine's output into ``log``,
    return the image id. Raises BuildError with the engine's last lines, Cancelled on ``cancel``."""
    import docker

    api = docker.APIClient(base_url=engine_url(docker_host), timeout=int(timeout_s), version=client.api.api_version)
    started = time.monotonic()
    steps = cached = 0
    image_id = None
    with tempfile.TemporaryFile() as tar_file:
        write_context(tar_file)
        size = tar_file.tell()
        tar_file.seek(0)
        log(f"building {tag} ({size / 1e6:.1f} MB context)")
        stream = api.build(fileobj=tar_file, custom_context=True, tag=tag, buildargs=buildargs, rm=True,
                           forcerm=True, network_mode="none", decode=True, pull=False, nocache=no_cache)
        error: str | None = None
        last: list[str] = []
        for chunk in _pump(stream, api, cancel):
            if "error" in chunk or "errorDetail" in chunk:
                error = str(chunk.get("error") or chunk.get("errorDetail", {}).get("message", "")).strip()
                continue
            if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                image_id = str(chunk["aux"]["ID"])
            for line in str(chunk.get("stream") or chunk.get("status") or "").splitlines():
                line = line.rstrip()
                if not line:
                    continue
                log(line)
                last = [*last[-19:], line]
                if _STEP.match(line):
                    steps += 1
                elif "Using cache" in line:
                    cached += 1
                elif line.startswith("Successfully built ") and image_id is None:
                    image_id = line.split()[-1]
    api.close()
    if error is not None or image_id is None:
        detail = error or "the engine ended the build without an image"
        raise BuildError(f"image build of {tag} failed: {detail}\nlast lines:\n" + "\n".join(last))
    image = client.images.get(image_id)
    log(f"built {tag} ({image.id[:19]}) in {time.monotonic() - started:.1f}s; {cached} of {steps} steps from cache")
    return str(image.id)


def _pump(stream: Iterator[dict[str, Any]], api: Any, cancel: threading.Event) -> Iterator[dict[str, Any]]:
    """Yield the engine's build output; on ``cancel`` drop the connection (the engine then
    stops the build) and raise Cancelled."""
    chunks: Queue[Any] = Queue()
    done = object()

    def read() -> None:
        try:
            for chunk in stream:
                chunks.put(chunk)
        except Exception as e:
            chunks.put(e)
        chunks.put(done)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while True:
        if cancel.is_set():
            api.close()
            raise Cancelled("image build stopped")
        try:
            item = chunks.get(timeout=_POLL_S)
        except Empty:
            continue
        if item is done:
            return
        if isinstance(item, Exception):
            raise BuildError(f"lost the engine during the build: {api_message(item)}") from item
        yield item


def api_message(e: BaseException) -> str:
    explanation = getattr(e, "explanation", None)
    if explanation:
        return str(explanation.decode() if isinstance(explanation, bytes) else explanation)
    stderr = getattr(e, "stderr", None)
    if stderr:
        return (stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(stderr)).strip()[-500:]
    return str(e).strip() or type(e).__name__
