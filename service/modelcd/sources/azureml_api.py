"""The Azure Machine Learning REST API (Azure Resource Manager), as far as modelcd needs it:
where a registered model version's files are (``reference/integrations.md`` §9).

- ``ModelVersionRef`` names a version in a workspace; its ``uri`` is the azure-ai-ml asset id
  ``azureml:/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.MachineLearningServices/
  workspaces/{ws}/models/{name}/versions/{version}``, which the Event Grid source puts in
  ``Registered.artifact_uri`` and ``parse_model_ref`` reads back.
- ``AzureMLClient.model_version`` GETs the model version resource (``properties.modelUri``);
  ``parse_model_uri`` turns an ``azureml://…/datastores/{ds}/paths/{path}`` URI (long or short
  form) into a ``DatastorePath``; ``AzureMLClient.datastore`` GETs the datastore (account,
  container, endpoint suffix, protocol) and ``datastore_secret`` POSTs ``listSecrets`` for its
  account key or SAS token.
- Authentication is a service principal read from ``AZURE_TENANT_ID``, ``AZURE_CLIENT_ID`` and
  ``AZURE_CLIENT_SECRET`` (``ServicePrincipal.from_env``): a client-credentials token from the
  Microsoft identity platform for the scope ``{management_url}/.default``, kept until shortly
  before it expires.

Requests go through ``pipelines/http.py``'s ``JsonHttp``: a timeout per attempt and bounded
retries of connection errors, 5xx and 429 (``Retry-After`` honoured). What retrying may fix
later is ``SourceUnavailable`` (the inbox backs off and tries again); what it will not is
``AzureMLError`` (or ``NotFound`` for a missing version), whose message says what to change.
No message, log line or repr contains the client secret, a token or a storage key.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlencode

import requests

from modelcd.errors import ConfigError, InvalidInput, ModelcdError, NotFound
from modelcd.pipelines.http import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_WAIT,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    USER_AGENT,
    ApiClient,
    JsonHttp,
    PipelineApiError,
    Reply,
    check_base_url,
    redact,
    segment,
)
from modelcd.sources.mlflow_server import SourceUnavailable

DEFAULT_API_VERSION = "2025-09-01"
MANAGEMENT_URL = "https://management.azure.com"
LOGIN_URL = "https://login.microsoftonline.com"
PROVIDER = "Microsoft.MachineLearningServices"
ENV_TENANT, ENV_CLIENT, ENV_SECRET = "AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"
TOKEN_EARLY_S = 300.0  # renew a token this long before it expires
ARM_ID_PREFIX = "azureml:"  # azure-ai-ml's prefix of an asset's ARM id

_WORKSPACE_RE = re.compile(
    r"/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/microsoft\.machinelearningservices/"
    r"workspaces/(?P<ws>[^/]+)", re.IGNORECASE)
_MODEL_REF_RE = re.compile(_WORKSPACE_RE.pattern + r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)",
                           re.IGNORECASE)
# azureml:// URI forms (azure-ai-ml constants/_common.py)
_LONG_DATASTORE_RE = re.compile(
    r"azureml://subscriptions/(?P<sub>[^/]+)/resource[gG]roups/(?P<rg>[^/]+)/workspaces/(?P<ws>[^/]+)/"
    r"datastores/(?P<ds>[^/]+)/paths/(?P<path>.*)")
_SHORT_DATASTORE_RE = re.compile(r"azureml://datastores/(?P<ds>[^/]+)/paths/(?P<path>.*)")
_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")
_CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?")
_ENDPOINT_RE = re.compile(r"[A-Za-z0-9.-]{1,253}")


class AzureMLError(ModelcdError):
    """Azure Machine Learning (or its storage) refused a request for a reason retrying will
    not fix: credentials, permissions, a model whose files modelcd cannot reach. The message
    says what to change."""

    code = "azureml_error"
    http_status = HTTPStatus.BAD_GATEWAY


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Workspace:
    """An Azure ML workspace by its ARM coordinates."""

    subscription: str
    resource_group: str
    name: str

    @property
    def resource_id(self) -> str:
        """The workspace's ARM id (segments percent-encoded)."""
        return (f"/subscriptions/{segment(self.subscription)}/resourceGroups/{segment(self.resource_group)}"
                f"/providers/{PROVIDER}/workspaces/{segment(self.name)}")


def parse_workspace(resource_id: str) -> Workspace | None:
    """The workspace an Event Grid ``topic`` (or CloudEvents ``source``) names, None when it
    names none (e.g. a registry's events)."""
    m = _WORKSPACE_RE.fullmatch(resource_id.rstrip("/"))
    if m is None:
        return None
    return Workspace(unquote(m["sub"]), unquote(m["rg"]), unquote(m["ws"]))


@dataclass(frozen=True)
class ModelVersionRef:
    """Model ``name`` version ``version`` registered in ``workspace``."""

    workspace: Workspace
    name: str
    version: str

    @property
    def resource_id(self) -> str:
        return f"{self.workspace.resource_id}/models/{segment(self.name)}/versions/{segment(self.version)}"

    @property
    def uri(self) -> str:
        """The asset id: ``azureml:`` + the version's ARM id."""
        return ARM_ID_PREFIX + self.resource_id


def parse_model_ref(uri: str) -> ModelVersionRef:
    """The version an ``azureml:/subscriptions/…/models/{name}/versions/{v}`` URI names;
    InvalidInput otherwise."""
    m = _MODEL_REF_RE.fullmatch(uri.removeprefix(ARM_ID_PREFIX)) if uri.startswith(ARM_ID_PREFIX + "/") else None
    if m is None:
        raise InvalidInput(f"{uri!r} is not an Azure ML model version id (azureml:/subscriptions/<sub>/resourceGroups/"
                           f"<rg>/providers/{PROVIDER}/workspaces/<ws>/models/<name>/versions/<version>)",
                           field="artifact_uri")
    ws = Workspace(unquote(m["sub"]), unquote(m["rg"]), unquote(m["ws"]))
    return ModelVersionRef(ws, unquote(m["name"]), unquote(m["version"]))


@dataclass(frozen=True)
class ModelVersionInfo:
    """What the model version resource says (``properties``). ``model_uri`` is where the
    files are; ``model_type`` is ``CustomModel``, ``MLFlowModel`` or ``TritonModel``."""

    name: str
    version: str
    model_uri: str
    model_type: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    flavors: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatastorePath:
    """A path (a folder prefix or one blob) inside datastore ``datastore`` of ``workspace``."""

    workspace: Workspace
    datastore: str
    path: str


def parse_model_uri(uri: str, workspace: Workspace) -> DatastorePath:
    """Where a ``modelUri`` points: the long or short ``azureml://…/datastores/{ds}/paths/{p}``
    form (the short one is relative to ``workspace``); AzureMLError naming the form for the
    ones modelcd cannot read (job outputs, registries, plain storage URLs)."""
    m = _LONG_DATASTORE_RE.fullmatch(uri)
    if m is not None:
        ws = Workspace(unquote(m["sub"]), unquote(m["rg"]), unquote(m["ws"]))
        return _datastore_path(ws, m["ds"], m["path"], uri)
    m = _SHORT_DATASTORE_RE.fullmatch(uri)
    if m is not None:
        return _datastore_path(workspace, m["ds"], m["path"], uri)
    if uri.startswith("azureml://jobs/"):
        why = "a job output; register the model from the job's datastore path instead"
    elif uri.startswith(("azureml://registries/", "https://", "http://")):
        why = "in an Azure ML registry or a plain storage URL; register it in a workspace"
    else:
        why = "not an azureml://…/datastores/<datastore>/paths/<path> URI"
    raise AzureMLError(f"the model's modelUri {uri!r} is {why}: modelcd fetches models from workspace datastores")


def _datastore_path(ws: Workspace, datastore: str, path: str, uri: str) -> DatastorePath:
    parts = [p for p in unquote(path).split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise AzureMLError(f"the model's modelUri {uri!r} names no usable path inside datastore {datastore!r}")
    folder = unquote(path).endswith("/")
    return DatastorePath(ws, unquote(datastore), "/".join(parts) + ("/" if folder else ""))


@dataclass(frozen=True)
class Datastore:
    """A workspace datastore (``properties``): for ``AzureBlob``, the storage account, its
    container, the endpoint suffix (``core.windows.net``) and protocol (``https``)."""

    name: str
    datastore_type: str
    account_name: str
    container_name: str
    endpoint: str
    protocol: str
    credentials_type: str

    def account_url(self, template: str | None = None) -> str:
        """The blob service URL of the account: ``{protocol}://{account}.blob.{endpoint}``, or
        ``template`` with ``{account}`` replaced (a storage emulator or a private endpoint)."""
        if template:
            return template.replace("{account}", self.account_name).rstrip("/")
        return f"{self.protocol}://{self.account_name}.blob.{self.endpoint}"


@dataclass(frozen=True)
class DatastoreSecret:
    """What ``listSecrets`` gave: ``kind`` ``AccountKey`` (``value`` the key) or ``Sas``
    (``value`` the SAS token)."""

    kind: str
    value: str = field(repr=False)


@dataclass(frozen=True)
class ServicePrincipal:
    """An Entra ID application that may read the workspace: the client-credentials grant."""

    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServicePrincipal:
        """From ``AZURE_TENANT_ID``, ``AZURE_CLIENT_ID``, ``AZURE_CLIENT_SECRET``; ConfigError
        naming the missing ones."""
        values = {k: (environ.get(k) or "").strip() for k in (ENV_TENANT, ENV_CLIENT, ENV_SECRET)}
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise ConfigError(f"Azure ML: {', '.join(missing)} not set; set {ENV_TENANT}, {ENV_CLIENT} and "
                              f"{ENV_SECRET} in modelcd's environment to a service principal that can read the "
                              "workspace (e.g. the AzureML Data Scientist role)", field=missing[0])
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", values[ENV_TENANT]):
            raise ConfigError(f"{ENV_TENANT}: not a tenant id or domain name", field=ENV_TENANT)
        return cls(values[ENV_TENANT], values[ENV_CLIENT], values[ENV_SECRET])


# --------------------------------------------------------------------------- tokens


@dataclass
class _Token:
    value: str = field(repr=False)
    expires_at: float


class TokenSource:
    """Client-credentials tokens of ``principal`` from the Microsoft identity platform at
    ``login_url`` (``POST {login_url}/{tenant}/oauth2/v2.0/token``), one per scope, kept
    until ``TOKEN_EARLY_S`` before they expire. Thread-safe."""

    def __init__(self, principal: ServicePrincipal, http: JsonHttp, clock: Callable[[], float] = time.time) -> None:
        self._principal = principal
        self._http = http
        self._clock = clock
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()

    def token(self, scope: str) -> str:
        """A bearer token for ``scope`` (e.g. ``https://management.azure.com/.default``)."""
        with self._lock:
            cached = self._tokens.get(scope)
            if cached is not None and cached.expires_at - TOKEN_EARLY_S > self._clock():
                return cached.value
            fresh = self._fetch(scope)
            self._tokens[scope] = fresh
            return fresh.value

    def forget(self, scope: str) -> None:
        """Drop the token of ``scope`` (it was refused): the next call asks for a new one."""
        with self._lock:
            self._tokens.pop(scope, None)

    def _fetch(self, scope: str) -> _Token:
        p = self._principal
        form = urlencode({"grant_type": "client_credentials", "client_id": p.client_id,
                          "client_secret": p.client_secret, "scope": scope}).encode()
        path = f"/{segment(p.tenant_id)}/oauth2/v2.0/token"
        reply = _call(self._http, "POST", path, what="get an Azure access token", raw=form, idempotent=True,
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, ok=(200, 400, 401),
                      secrets=(p.client_secret,))
        body = reply.body if isinstance(reply.body, dict) else {}
        if reply.status != 200:
            error = str(body.get("error") or "refused")
            detail = str(body.get("error_description") or "").strip().splitlines()
            raise AzureMLError(redact(
                f"the Microsoft identity platform refused the service principal ({reply.status} {error}"
                f"{': ' + detail[0][:300] if detail else ''}); check {ENV_TENANT}, {ENV_CLIENT} and {ENV_SECRET}",
                (p.client_secret,)), field=ENV_CLIENT)
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not token:
            raise AzureMLError("the Microsoft identity platform answered 200 without an access_token; is "
                               "azureml_login_url the identity platform's address?", field="azureml_login_url")
        try:
            lifetime = float(expires_in) if expires_in is not None else 3600.0
        except (TypeError, ValueError):
            lifetime = 3600.0
        return _Token(token, self._clock() + lifetime)


# --------------------------------------------------------------------------- the client


class AzureMLClient(ApiClient):
    """Azure ML control-plane reads for one service principal.

    ``management_url`` is Azure Resource Manager (``https://management.azure.com``; a
    sovereign cloud's, or a stand-in in tests); tokens are asked for its ``/.default`` scope
    at ``login_url``. ``api_version`` is sent as ``?api-version=`` on every ARM call."""

    def __init__(self, principal: ServicePrincipal, *, management_url: str = MANAGEMENT_URL,
                 login_url: str = LOGIN_URL, api_version: str = DEFAULT_API_VERSION,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 max_wait: float = DEFAULT_MAX_WAIT, sleep: Callable[[float], None] = time.sleep,
                 session: requests.Session | None = None, clock: Callable[[], float] = time.time) -> None:
        management_url = check_base_url(management_url, "azureml_management_url")
        login_url = check_base_url(login_url, "azureml_login_url")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", api_version):
            raise InvalidInput(f"azureml_api_version: {api_version!r} is not an ARM api-version (e.g. "
                               f"{DEFAULT_API_VERSION})", field="azureml_api_version")
        self.api_version = api_version
        self.scope = management_url + "/.default"
        common = {"service": "Azure Machine Learning", "timeout": timeout, "retries": retries, "backoff": backoff,
                  "max_wait": max_wait, "sleep": sleep, "clock": clock,
                  "secrets": (principal.client_secret,)}
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        self._http = JsonHttp(management_url, headers=headers, session=session, **common)
        login = JsonHttp(login_url, headers=headers, session=session, **{**common, "service": "Microsoft Entra ID"})
        self._tokens = TokenSource(principal, login, clock)
        self._login = login

    def close(self) -> None:
        self._http.close()
        self._login.close()

    def model_version(self, ref: ModelVersionRef) -> ModelVersionInfo:
        """The model version ``ref`` names; NotFound when the workspace has no such version."""
        body = self._arm("GET", ref.resource_id, f"read Azure ML model {ref.name} version {ref.version}",
                         missing=f"Azure ML has no model {ref.name!r} version {ref.version!r} in workspace "
                                 f"{ref.workspace.name!r}")
        props = _object(body.get("properties"), "properties")
        uri = props.get("modelUri")
        if not isinstance(uri, str) or not uri:
            raise AzureMLError(f"Azure ML model {ref.name} version {ref.version} has no modelUri: it has no files "
                               "to deploy")
        tags = props.get("tags") if isinstance(props.get("tags"), dict) else {}
        flavors = props.get("flavors") if isinstance(props.get("flavors"), dict) else {}
        return ModelVersionInfo(name=ref.name, version=ref.version, model_uri=uri,
                                model_type=str(props.get("modelType") or "CustomModel"),
                                description=str(props.get("description") or ""),
                                tags={str(k): "" if v is None else str(v) for k, v in tags.items()},
                                flavors=tuple(sorted(str(k) for k in flavors)))

    def datastore(self, workspace: Workspace, name: str) -> Datastore:
        """Datastore ``name`` of ``workspace``; AzureMLError for one that is not Azure Blob."""
        path = f"{workspace.resource_id}/datastores/{segment(name)}"
        body = self._arm("GET", path, f"read Azure ML datastore {name}",
                         missing=f"workspace {workspace.name!r} has no datastore {name!r}")
        props = _object(body.get("properties"), "properties")
        kind = str(props.get("datastoreType") or "")
        if kind != "AzureBlob":
            raise AzureMLError(f"datastore {name!r} is of type {kind or 'unknown'!r}: modelcd fetches model files "
                               "from AzureBlob datastores only")
        creds = props.get("credentials") if isinstance(props.get("credentials"), dict) else {}
        store = Datastore(name=name, datastore_type=kind, account_name=str(props.get("accountName") or ""),
                          container_name=str(props.get("containerName") or ""),
                          endpoint=str(props.get("endpoint") or "core.windows.net"),
                          protocol=str(props.get("protocol") or "https"),
                          credentials_type=str(creds.get("credentialsType") or "None"))
        if not _ACCOUNT_RE.fullmatch(store.account_name) or not _CONTAINER_RE.fullmatch(store.container_name):
            raise AzureMLError(f"datastore {name!r} names no valid storage account and container")
        if store.protocol not in ("https", "http") or not _ENDPOINT_RE.fullmatch(store.endpoint):
            raise AzureMLError(f"datastore {name!r}: protocol {store.protocol!r} or endpoint {store.endpoint!r} is "
                               "not usable")
        return store

    def datastore_secret(self, workspace: Workspace, name: str) -> DatastoreSecret:
        """The account key or SAS token Azure ML keeps for datastore ``name`` (``listSecrets``)."""
        path = f"{workspace.resource_id}/datastores/{segment(name)}/listSecrets"
        body = self._arm("POST", path, f"read the credentials of Azure ML datastore {name}",
                         missing=f"workspace {workspace.name!r} has no datastore {name!r}")
        kind = body.get("secretsType")
        value = body.get("key") if kind == "AccountKey" else body.get("sasToken") if kind == "Sas" else None
        if not isinstance(value, str) or not value:
            raise AzureMLError(f"datastore {name!r} has no account key or SAS token in Azure ML (secretsType "
                               f"{kind!r}): give it one, or set azureml_storage_credential to account_key and "
                               "the key in AZURE_STORAGE_KEY")
        return DatastoreSecret(str(kind), value)

    def _arm(self, method: str, path: str, what: str, *, missing: str) -> dict[str, Any]:
        """One ARM call: a fresh token on 401 once, ARM's own error message in ours."""
        for attempt in (0, 1):
            token = self._tokens.token(self.scope)
            reply = _call(self._http, method, path, what=what, params={"api-version": self.api_version},
                          headers={"Authorization": f"Bearer {token}"}, ok=(200, 400, 401, 403, 404),
                          secrets=(token,), idempotent=True, raw=b"" if method == "POST" else None)
            if reply.status == 401 and attempt == 0:
                self._tokens.forget(self.scope)
                continue
            break
        if reply.status == 200:
            return _object(reply.body, "body")
        detail = _arm_message(reply.body)
        if reply.status == 404:
            raise NotFound(f"{missing}{detail}; check the name, the version and the workspace in the event")
        fix = {401: f"Azure Resource Manager refused the token: check that {ENV_TENANT} is the workspace's tenant",
               403: f"the service principal ({ENV_CLIENT}) may not do this: give it a role on the workspace that "
                    "reads models and datastores (and lists datastore secrets), e.g. AzureML Data Scientist",
               400: "Azure Resource Manager refused the request: check azureml_api_version"}[reply.status]
        raise AzureMLError(f"{what}: {reply.status} {HTTPStatus(reply.status).phrase}{detail}; {fix}")


def _call(http: JsonHttp, method: str, path: str, *, secrets: Iterable[str], **kw: Any) -> Reply:
    """``http.call``, its errors as SourceUnavailable (may heal) or AzureMLError (will not)."""
    try:
        return http.call(method, path, secrets=tuple(secrets), **kw)
    except PipelineApiError as e:
        if e.retryable:
            raise SourceUnavailable(e.message) from None
        raise AzureMLError(e.message) from None


def _arm_message(body: Any) -> str:
    """``: {code}: {message}`` from ARM's ``{"error": {"code", "message"}}``, or ""."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ""
    parts = [str(error[k]).strip() for k in ("code", "message") if isinstance(error.get(k), str) and error[k].strip()]
    text = ": ".join(parts)
    return f": {text[:300]}" if text else ""


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AzureMLError(f"Azure ML answered without a JSON object in {where}: is azureml_management_url Azure "
                           "Resource Manager's address?")
    return value
