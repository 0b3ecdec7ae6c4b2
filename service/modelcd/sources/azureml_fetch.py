"""Fetching a registered Azure ML model version's files into a folder: the model version and
its datastore through the Azure ML REST API (``azureml_api.py``), then the blobs with the
Azure SDK (``azure-storage-blob``).

The model's ``modelUri`` must be a workspace datastore path (``azureml://…/datastores/{ds}/
paths/{path}``, long or short form) on an ``AzureBlob`` datastore: a folder prefix (every blob
under it, keeping the layout below it) or one blob. The storage credential is, by
``azureml_storage_credential``:

- ``datastore`` (default): the datastore's own account key or SAS token, which Azure ML hands
  the service principal (``listSecrets``), as azure-ai-ml's ``Model`` download does;
- ``account_key``: the account key in ``AZURE_STORAGE_KEY``.

The account's blob URL is ``{protocol}://{account}.blob.{endpoint}`` from the datastore, or
``azureml_blob_url`` with ``{account}`` replaced (a private endpoint, or Azurite in tests).
Errors: ``SourceUnavailable`` (storage or Azure ML unreachable, 5xx, 429: retried with
backoff), ``AzureMLError`` / ``NotFound`` / ``InvalidInput`` (will not heal). Neither a key,
a SAS token nor a signed URL appears in a message."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcd.config import Settings
from modelcd.errors import ConfigError, InvalidInput
from modelcd.registry.archive import safe_relpath
from modelcd.sources.azureml_api import (
    AzureMLClient,
    AzureMLError,
    Datastore,
    DatastorePath,
    ModelVersionInfo,
    ModelVersionRef,
    ServicePrincipal,
    parse_model_ref,
    parse_model_uri,
)
from modelcd.sources.mlflow_server import SourceUnavailable

log = logging.getLogger(__name__)

STORAGE_KEY_ENV = "AZURE_STORAGE_KEY"
BLOB_RETRIES = 2  # the SDK's own retries per request (modelcd's inbox backs off after these)
BLOB_CONNECT_TIMEOUT_S = 10
BLOB_READ_TIMEOUT_S = 120


@dataclass(frozen=True)
class FetchedAzureModel:
    """An Azure ML model version, downloaded into ``files_dir`` (``blobs`` files, ``size``
    bytes); ``info`` is what Azure ML says about it (type, tags, description)."""

    ref: ModelVersionRef
    info: ModelVersionInfo
    files_dir: Path
    blobs: int
    size: int


def client_from_settings(settings: Settings, environ: Mapping[str, str]) -> AzureMLClient:
    """An ``AzureMLClient`` for the service principal in ``environ`` and the base URLs and
    api-version in ``settings``."""
    return AzureMLClient(ServicePrincipal.from_env(environ), management_url=settings.azureml_management_url,
                         login_url=settings.azureml_login_url, api_version=settings.azureml_api_version)


def fetch_model_version(settings: Settings, uri: str, dest: Path, *, environ: Mapping[str, str] | None = None,
                        client: AzureMLClient | None = None) -> FetchedAzureModel:
    """Download the version ``uri`` names (``azureml:/subscriptions/…/models/{n}/versions/{v}``)
    into ``dest`` (which must not exist yet)."""
    ref = parse_model_ref(uri)
    env = os.environ if environ is None else environ
    with contextlib.closing(client or client_from_settings(settings, env)) as api:
        info = api.model_version(ref)
        where = parse_model_uri(info.model_uri, ref.workspace)
        store = api.datastore(where.workspace, where.datastore)
        credential, secret = _credential(settings, api, where, store, env)
    url = store.account_url(settings.azureml_blob_url)
    blobs, size = download_blobs(url, store.container_name, where.path, credential, dest,
                                 settings.max_artifact_bytes, secrets=(secret,))
    log.info("azureml %s/%s: %d file(s), %d bytes from %s/%s/%s", ref.name, ref.version, blobs, size, url,
             store.container_name, where.path)
    return FetchedAzureModel(ref, info, dest, blobs, size)


def _credential(settings: Settings, api: AzureMLClient, where: DatastorePath, store: Datastore,
                env: Mapping[str, str]) -> tuple[Any, str]:
    """(the SDK credential, the secret inside it) for ``store``'s account."""
    if settings.azureml_storage_credential == "account_key":
        key = (env.get(STORAGE_KEY_ENV) or "").strip()
        if not key:
            raise ConfigError(f"azureml_storage_credential is account_key but {STORAGE_KEY_ENV} is not set; set it "
                              f"to the key of storage account {store.account_name!r}", field=STORAGE_KEY_ENV)
        return {"account_name": store.account_name, "account_key": key}, key
    secret = api.datastore_secret(where.workspace, where.datastore)
    if secret.kind == "Sas":
        from azure.core.credentials import AzureSasCredential

        return AzureSasCredential(secret.value.lstrip("?")), secret.value
    return {"account_name": store.account_name, "account_key": secret.value}, secret.value


def download_blobs(account_url: str, container: str, path: str, credential: Any, dest: Path, max_bytes: int,
                   secrets: tuple[str, ...] = ()) -> tuple[int, int]:
    """Download blob ``path`` of ``container`` (one blob, named exactly), or every blob under
    the folder ``path``, into ``dest``; (number of files, bytes)."""
    from azure.core.exceptions import AzureError
    from azure.storage.blob import ContainerClient, ExponentialRetry

    where = f"{account_url}/{container}/{path}"
    # the SDK's default waits 15 s, then 18 s...: modelcd's inbox has its own backoff
    retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=BLOB_RETRIES, random_jitter_range=1)
    client = ContainerClient(account_url, container, credential=credential, retry_policy=retry,
                             connection_timeout=BLOB_CONNECT_TIMEOUT_S, read_timeout=BLOB_READ_TIMEOUT_S)
    try:
        with client:
            plan = _plan(path, [(b.name, int(b.size or 0)) for b in
                                client.list_blobs(name_starts_with=path.rstrip("/"))], where, max_bytes)
            dest.mkdir(parents=True)
            for name, rel in plan:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as f:
                    client.download_blob(name, max_concurrency=1).readinto(f)
    except AzureError as e:
        raise _storage_error(e, where, secrets) from None
    return len(plan), sum((dest / rel).stat().st_size for _, rel in plan)


def _plan(path: str, listed: list[tuple[str, int]], where: str, max_bytes: int) -> list[tuple[str, str]]:
    """(blob name, relative file path) to download: the blob named ``path`` exactly, else
    every blob under ``path/``; InvalidInput / AzureMLError when that is unsafe or empty."""
    exact = [(n, s) for n, s in listed if n == path and not path.endswith("/")]
    prefix = path.rstrip("/") + "/"
    chosen = exact or [(n, s) for n, s in listed if n.startswith(prefix) and not n.endswith("/")]
    if not chosen:
        raise AzureMLError(f"{where}: no blobs there; the model version's files are missing from its datastore")
    total = sum(s for _, s in chosen)
    if total > max_bytes:
        raise InvalidInput(f"{where}: {total} bytes, over MODELCD_MAX_ARTIFACT_BYTES ({max_bytes})",
                           field="artifact_uri")
    plan: list[tuple[str, str]] = []
    for name, _ in chosen:
        try:
            rel = safe_relpath(name.rsplit("/", 1)[-1] if exact else name[len(prefix):])
        except ValueError as e:
            raise InvalidInput(f"{where}: blob {name!r} {e}", field="artifact_uri") from None
        if rel is None:
            continue
        plan.append((name, rel))
    return plan


def _storage_error(e: Exception, where: str, secrets: tuple[str, ...]) -> Exception:
    """SourceUnavailable or AzureMLError for an SDK error, from its status and error code
    only (its text may carry a signed URL)."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    status = getattr(e, "status_code", None)
    code = getattr(e, "error_code", None) or ""
    code = str(getattr(code, "value", code))  # the SDK's StorageErrorCode enum, or a string
    said = f" ({status}{' ' + code if code else ''})" if status else ""
    if isinstance(e, ServiceRequestError | ServiceResponseError):
        return SourceUnavailable(f"Azure Storage: cannot reach {where} ({type(e).__name__}); retry later")
    if isinstance(e, ClientAuthenticationError) or status in (401, 403):
        return AzureMLError(f"Azure Storage refused the credential for {where}{said}: check the datastore's account "
                            "key (or AZURE_STORAGE_KEY with azureml_storage_credential account_key)")
    if isinstance(e, ResourceNotFoundError):
        return AzureMLError(f"Azure Storage: {where} not found{said}; check the datastore's container")
    if isinstance(e, HttpResponseError) and (status is None or status >= 500 or status == 429):
        return SourceUnavailable(f"Azure Storage: {where}{said}; retry later")
    message = f"Azure Storage: {where}: {type(e).__name__}{said}"
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return AzureMLError(message)
