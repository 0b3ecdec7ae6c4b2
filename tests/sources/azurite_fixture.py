"""Azurite, Microsoft's Azure Storage emulator (blob service only), on 127.0.0.1 for the
Azure ML tests. ``scripts/azurite`` (called by ``scripts/test``) npm-installs it into
``$MODELCD_AZURITE_DIR`` (default ``~/.cache/modelcd/azurite``); an ``azurite-blob`` on PATH
works too. Under ``CI=true`` a test that needs it fails when it cannot start; elsewhere it
skips with the fix.

Azurite runs with ``--skipApiVersionCheck``: azure-storage-blob sends an ``x-ms-version``
newer than Azurite 3.35 knows (``reference/integrations.md`` §9.6). The account is the
emulator's well-known ``devstoreaccount1``; its key is public and reaches modelcd the way a
real key would (``AZURE_STORAGE_KEY``, or a datastore's ``listSecrets``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelcd.targets.process import free_port
from tests.sources.azureml_standin import DEV_ACCOUNT, DEV_KEY


def azurite_binary() -> Path | None:
    """The ``azurite-blob`` scripts/azurite installed, or one on PATH."""
    home = os.environ.get("MODELCD_AZURITE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelcd" / "azurite")
    installed = Path(home) / "node_modules" / ".bin" / "azurite-blob"
    if installed.is_file():
        return installed
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class Azurite:
    """A running Azurite blob service: ``url`` is the account's blob URL (path style)."""

    host: str
    port: int
    account: str = DEV_ACCOUNT
    key: str = DEV_KEY

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/{self.account}"

    @property
    def url_template(self) -> str:
        """``azureml_blob_url`` pointing at this emulator."""
        return f"http://{self.host}:{self.port}/{{account}}"

    def container(self, name: str) -> Any:
        """A ContainerClient of ``name`` (created when missing)."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(self.url, credential={"account_name": self.account, "account_key": self.key})
        container = service.get_container_client(name)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        return container

    def upload_folder(self, container: str, folder: Path, prefix: str) -> list[str]:
        """Upload every file under ``folder`` as ``prefix/<relative path>``; the blob names."""
        names = []
        with self.container(container) as client:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                name = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
                with path.open("rb") as f:
                    client.upload_blob(name, f, overwrite=True)
                names.append(name)
        return names


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service for the session, on a free loopback port, data in a temp folder."""
    binary = azurite_binary()
    if binary is None:
        _unavailable("Azurite is not installed: run `bash scripts/azurite` (npm install azurite), or put "
                     "azurite-blob on PATH")
    assert binary is not None
    data = tmp_path_factory.mktemp("azurite")
    port = free_port()
    log = data / "azurite.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                                 str(data / "data"), "--silent", "--disableTelemetry", "--skipApiVersionCheck"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _listening("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                _unavailable(f"Azurite did not start on 127.0.0.1:{port}: {log.read_text(errors='replace')[-500:]}")
            time.sleep(0.1)
        yield Azurite("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
