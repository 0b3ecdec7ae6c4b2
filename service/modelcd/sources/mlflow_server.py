"""Talking to a real MLflow tracking server (MLflow ≥ 3.3) through MLflow's own client.

- ``fetch_model_version`` downloads a registered version's files (``models:/name/version``)
  into a plain folder and reads what its ``MLmodel`` says: flavor (sklearn, or pyfunc for
  any other MLflow model), model file, requirements, an input sample shaped as a scoring
  request, and the expected output a user gave (tag ``modelcd.expected`` or
  ``expected.json``).
- ``poll_new_versions`` finds versions registered since the last call, for servers that
  cannot send webhooks; its ``PollCursor`` makes it exactly-once and is stored as JSON.
- ``connect_webhook`` / ``test_webhook`` / ``disconnect_webhook`` manage the server's
  webhook that calls ``/hooks/mlflow`` (the intake lives in ``sources/mlflow.py``).

Failures are ``ModelcdError``s: ``SourceUnavailable`` when the server cannot be reached or
answers 5xx/429 (retry later with backoff), ``NotFound`` for a missing version,
``InvalidInput`` for a request MLflow refuses, ``MlflowSourceError`` for the rest.
MLflow's client retries for minutes by default; here it gives up after a few seconds
unless ``MLFLOW_HTTP_REQUEST_*`` variables say otherwise, so the caller's own backoff
decides. The ``mlflow`` (or ``mlflow-skinny``) package is imported on first use only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from modelcd.domain import Flavor
from modelcd.errors import ArtifactStoreError, ConfigError, InvalidInput, ModelcdError, NotFound
from modelcd.registry.archive import iter_tree, move_into_place, prepare_dest, safe_relpath, temp_sibling
from modelcd.registry.flavors import pyfunc_conf
from modelcd.registry.requirements import load_pyfunc_environment, load_requirements
from modelcd.registry.samples import files_expected, mlmodel_sample, parse_expected
from modelcd.registry.yaml_errors import yaml_problem

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
    from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

MLMODEL = "MLmodel"
EXPECTED_TAG = "modelcd.expected"  # a version tag holding the expected predictions (JSON) for its sample
# written by MLflow's models:/ download itself (name and version), not part of the model
DOWNLOAD_META_FILES = ("registered_model_meta",)
SKLEARN_FORMATS = ("pickle", "cloudpickle", "skops")  # what the sklearn flavor loads (skops: MLflow 3's default)
DEFAULT_EVENTS = ("model_version.created",)
MAX_MODEL_URI_HOPS = 4
POLL_PAGE_SIZE = 200
POLL_LOOKBACK_MS = 5_000
_READY, _PENDING, _FAILED = "READY", "PENDING_REGISTRATION", "FAILED_REGISTRATION"

# MLflow's REST client retries 7 times with 2 s exponential backoff and a 120 s timeout
# (minutes before an error). modelcd retries on its own schedule, so fail within seconds;
# a variable the user set wins.
CLIENT_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
_limits_lock = threading.Lock()
_limits_depth = 0
_limits_set: list[str] = []

_FIX_RUNNING = "check that the MLflow tracking server is running and the URI is right, then retry"


class SourceUnavailable(ModelcdError):
    """The external registry could not be reached, timed out or answered 5xx/429; the same
    call may succeed later, so retry it with backoff."""

    code = "source_unavailable"
    http_status = HTTPStatus.SERVICE_UNAVAILABLE
    retryable = True


class MlflowSourceError(ModelcdError):
    """The MLflow server refused a request for a reason retrying will not fix (credentials,
    not an MLflow server, a model it cannot describe); the message says what to change."""

    code = "mlflow_error"
    http_status = HTTPStatus.BAD_GATEWAY


# --------------------------------------------------------------------------- typed results


@dataclass(frozen=True)
class FetchedModel:
    """A registered MLflow model version, downloaded.

    ``files_dir`` holds only regular files. ``flavor`` is ``sklearn`` (with ``model_file``)
    when the ``MLmodel`` names a saved scikit-learn model (pickle, cloudpickle or skops), else
    ``pyfunc`` (``model_file`` is ``MLmodel``) for any model with a ``python_function``
    flavor, with ``requirements`` to serve it by mlflow.pyfunc (``mlflow`` as
    ``mlflow-skinny``) and ``python`` the version it was saved with; None lets modelcd's own
    detection decide (``notes`` say why). ``sample`` is a scoring request body
    (``{"dataframe_split": ...}``, ``{"inputs": ...}``...) or None; ``expected`` the
    predictions a user gave for it (tag ``modelcd.expected`` or file ``expected.json``)."""

    name: str
    version: str
    files_dir: Path
    flavor: Flavor | None
    model_file: str | None
    requirements: tuple[str, ...]
    sample: dict[str, Any] | None
    run_id: str | None
    source: str
    description: str
    tags: dict[str, str]
    external_ref: str  # models:/<name>/<version>
    notes: tuple[str, ...] = ()
    expected: list[Any] | None = None
    python: str | None = None  # pyfunc: the Python version the model was saved with


@dataclass(frozen=True)
class VersionRef:
    """A model version the poller found: enough to fetch it and to deduplicate it."""

    name: str
    version: str
    creation_timestamp: int  # ms since the epoch, MLflow's clock
    status: str  # READY or PENDING_REGISTRATION (fetching a pending one raises SourceUnavailable)
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def external_ref(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class PollCursor:
    """Where a poll left off.

    Every version created at or before ``timestamp`` (ms, MLflow's clock) has been returned,
    except ones that appear later with an older timestamp (a slow commit): those are still
    found within the lookback window, because ``seen`` keeps the (name, version, timestamp)
    of each version already returned inside it, so nothing is returned twice."""

    timestamp: int
    seen: frozenset[tuple[str, str, int]] = frozenset()

    def to_json(self) -> str:
        """The cursor as compact JSON, for the caller's database."""
        seen = sorted([n, v, t] for n, v, t in self.seen)
        return json.dumps({"v": 1, "timestamp": self.timestamp, "seen": seen}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> PollCursor:
        """Parse ``to_json`` output; InvalidInput when it is not a cursor."""
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ValueError("not a version 1 cursor")
            seen = frozenset((str(n), str(v), int(t)) for n, v, t in doc["seen"])
            return cls(int(doc["timestamp"]), seen)
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidInput(f"cursor: not an MLflow poll cursor ({e}); drop it to poll from the start",
                               field="cursor") from None

    def has_seen(self, ref: VersionRef) -> bool:
        return (ref.name, ref.version, ref.creation_timestamp) in self.seen


@dataclass(frozen=True)
class WebhookCheck:
    """What MLflow's test delivery to a webhook got back."""

    success: bool  # the receiver answered < 400
    response_status: int | None
    response_body: str | None
    error_message: str | None


# --------------------------------------------------------------------------- client and errors


def _import_mlflow() -> Any:
    try:
        import mlflow.artifacts
    except ImportError as e:
        raise ConfigError("MLflow source: the mlflow package is not installed; install it with "
                          "`pip install 'mlflow-skinny>=3.3'` (or 'mlflow>=3.3') next to modelcd") from e
    return mlflow


def redact_uri(uri: str) -> str:
    """``uri`` without credentials or query string, safe for messages and logs."""
    try:
        parts = urlsplit(uri)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
    except ValueError:
        return "<unparseable URI>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_tracking_uri(uri: str) -> str:
    parts = urlsplit(uri) if isinstance(uri, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"tracking_uri: {redact_uri(str(uri))!r} is not an MLflow tracking server URL; give "
                           "its http(s) address, e.g. http://127.0.0.1:5000", field="tracking_uri")
    if parts.username or parts.password:
        raise InvalidInput("tracking_uri: credentials in the URL are not supported; set MLFLOW_TRACKING_TOKEN "
                           "or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD instead", field="tracking_uri")
    return uri.rstrip("/")


@contextmanager
def _client_limits() -> Iterator[None]:
    """Make MLflow's REST client fail within seconds while any call here runs (see
    CLIENT_LIMITS). Process-wide: MLflow reads these variables on every request."""
    global _limits_depth
    with _limits_lock:
        if _limits_depth == 0:
            for key, value in CLIENT_LIMITS.items():
                if key not in os.environ:
                    os.environ[key] = value
                    _limits_set.append(key)
        _limits_depth += 1
    try:
        yield
    finally:
        with _limits_lock:
            _limits_depth -= 1
            if _limits_depth == 0:
                for key in _limits_set:
                    os.environ.pop(key, None)
                _limits_set.clear()


def _client(tracking_uri: str) -> MlflowClient:
    mlflow = _import_mlflow()
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_connection_problem(e: BaseException) -> bool:
    """True when MLflow's error was caused by the network (refused, reset, timed out, or
    retries exhausted on 5xx/429), which it only keeps as the implicit exception context."""
    import requests

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                      | requests.exceptions.RetryError | requests.exceptions.ChunkedEncodingError
                      | ConnectionError | TimeoutError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _scrub(text: str, tracking_uri: str, secret: str | None) -> str:
    text = text.replace(tracking_uri, redact_uri(tracking_uri))
    if secret:
        text = text.replace(secret, "***")
    return text if len(text) <= 500 else text[:500] + "..."


def translate_error(e: MlflowException, what: str, tracking_uri: str, secret: str | None = None,
                    field_name: str | None = None) -> ModelcdError:
    """The ModelcdError for MLflow's exception ``e`` raised while doing ``what``."""
    where = redact_uri(tracking_uri)
    message = _scrub(getattr(e, "message", None) or str(e), tracking_uri, secret)
    if _is_connection_problem(e):
        return SourceUnavailable(f"{what}: cannot reach the MLflow tracking server at {where} ({message}); "
                                 f"{_FIX_RUNNING}")
    code = str(getattr(e, "error_code", ""))
    status = e.get_http_status_code() if hasattr(e, "get_http_status_code") else 500
    if code == "RESOURCE_DOES_NOT_EXIST":
        return NotFound(f"{what}: {message}; check the model name and version in MLflow at {where}")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or status in (401, 403):
        return MlflowSourceError(f"{what}: the MLflow server at {where} refused the credentials ({message}); "
                                 "set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
                                 "for a user with access")
    if code == "ENDPOINT_NOT_FOUND" or status in (404, 405, 501):
        return MlflowSourceError(f"{what}: {where} does not offer this MLflow API ({message}); point tracking_uri "
                                 "at an MLflow tracking server (webhooks need MLflow >= 3.3 with a SQL backend store)")
    if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE") or status == 400:
        return InvalidInput(f"{what}: the MLflow server refused it: {message}", field=field_name)
    if status >= 500 or status == 429:
        return SourceUnavailable(f"{what}: the MLflow server at {where} failed ({message}); retry later, and "
                                 "see the MLflow server's log if it keeps failing")
    return MlflowSourceError(f"{what}: MLflow error {code or status}: {message}")


@contextmanager
def _mlflow_call(what: str, tracking_uri: str, secret: str | None = None,
                 field_name: str | None = None) -> Iterator[None]:
    """Run MLflow client calls with short retries, turning MLflow's errors into ours."""
    _import_mlflow()
    from mlflow.exceptions import MlflowException

    with _client_limits():
        try:
            yield
        except MlflowException as e:
            raise translate_error(e, what, tracking_uri, secret, field_name) from e
        except OSError as e:  # artifact transfers can fail below MLflow's wrapping
            message = _scrub(str(e), tracking_uri, secret)
            if _is_connection_problem(e):
                raise SourceUnavailable(f"{what}: lost the connection to the MLflow server at "
                                        f"{redact_uri(tracking_uri)} ({message}); {_FIX_RUNNING}") from e
            raise ArtifactStoreError(f"{what}: cannot write the downloaded files ({message}); check the "
                                     "destination folder's free space and permissions") from e


# --------------------------------------------------------------------------- fetch


def resolve_artifact_uri(client: MlflowClient, name: str, version: str) -> str:
    """Where the files of ``name``/``version`` are (``mlflow-artifacts:/...``, ``runs:/...``,
    ``s3://...``), asked of this client's server. MLflow's own ``models:/`` download looks
    the version up in the process-wide registry URI whatever it is passed, so resolve here:
    the version's download URI, then a logged model's (``models:/m-...``) artifact location."""
    uri = client.get_model_version_download_uri(name, version)
    for _ in range(MAX_MODEL_URI_HOPS):
        if not uri.startswith("models:/"):
            return uri
        rest = uri[len("models:/"):].strip("/")
        if "/" in rest:  # another registered version: models:/<name>/<version>
            uri = client.get_model_version_download_uri(*rest.split("/", 1))
        elif "@" in rest:  # models:/<name>@<alias>
            target = client.get_model_version_by_alias(*rest.split("@", 1))
            uri = client.get_model_version_download_uri(target.name, target.version)
        else:  # a logged model: models:/<model_id>
            uri = client.get_logged_model(rest).artifact_location
    raise MlflowSourceError(f"model version {name}/{version}: its files are behind more than "
                            f"{MAX_MODEL_URI_HOPS} models:/ references; register the version from the files' URI")


def _download(client: MlflowClient, client_uri: str, name: str, version: str, dest: Path) -> None:
    """Download the files of ``name``/``version`` into the empty-or-absent folder ``dest``;
    on any failure nothing is left at ``dest``."""
    mlflow = _import_mlflow()
    source = resolve_artifact_uri(client, name, version)
    prepare_dest(dest)
    tmp = temp_sibling(dest)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                         tracking_uri=client_uri, registry_uri=client_uri))
        root = local if local.is_dir() else tmp  # a folder lands in tmp/<its name>; a single file in tmp
        for meta in DOWNLOAD_META_FILES:
            (root / meta).unlink(missing_ok=True)
        list(iter_tree(root))  # raises InvalidInput for links and special files
        move_into_place(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_mlmodel(files_dir: Path) -> dict[str, Any]:
    """The parsed ``MLmodel`` at the root of ``files_dir``; MlflowSourceError when it is
    missing or not a YAML mapping."""
    path = files_dir / MLMODEL
    if not path.is_file():
        raise MlflowSourceError(f"{MLMODEL}: the downloaded version has no {MLMODEL} file at its root, so it is not "
                                "an MLflow model; register it with mlflow.<flavor>.log_model(...), or register the "
                                "files with modelcd directly")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MlflowSourceError(f"{MLMODEL}: not valid YAML ({yaml_problem(e)}); re-save the model with mlflow") \
            from None
    if not isinstance(doc, dict):
        raise MlflowSourceError(f"{MLMODEL}: not a YAML mapping; re-save the model with mlflow")
    return doc


def sklearn_model_file(mlmodel: dict[str, Any], files_dir: Path) -> tuple[str | None, str | None]:
    """(model file, None) when ``MLmodel`` names a saved scikit-learn model that exists in
    ``files_dir``; else (None, a note saying why modelcd's own detection must decide)."""
    flavors = mlmodel.get("flavors")
    conf = flavors.get("sklearn") if isinstance(flavors, dict) else None
    if not isinstance(conf, dict) or not isinstance(conf.get("pickled_model"), str):
        return None, None
    fmt = str(conf.get("serialization_format") or "pickle")
    if fmt not in SKLEARN_FORMATS:
        return None, (f"{MLMODEL}: the scikit-learn model is saved as {fmt!r}, which the sklearn flavor cannot "
                      "load; re-log it with serialization_format='skops' (or 'cloudpickle'), or add a score.py")
    try:
        rel = safe_relpath(conf["pickled_model"])
    except ValueError as e:
        return None, f"{MLMODEL}: pickled_model {conf['pickled_model']!r} {e}"
    if rel is None or not (files_dir / rel).is_file():
        return None, f"{MLMODEL}: pickled_model {conf['pickled_model']!r} is not among the downloaded files"
    return rel, None


def read_sample(files_dir: Path, mlmodel: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(scoring request, None) from ``serving_input_example.json``, else from
    ``input_example.json``; (None, note) when neither gives a usable sample."""
    return mlmodel_sample(files_dir, mlmodel)


def _version_info(client: MlflowClient, name: str, version: str) -> MlflowModelVersion:
    mv = client.get_model_version(name, version)
    status = str(mv.status or _READY)
    if status == _PENDING:
        raise SourceUnavailable(f"model version {name}/{version}: MLflow is still registering it "
                                "(PENDING_REGISTRATION); retry in a moment")
    if status == _FAILED:
        raise MlflowSourceError(f"model version {name}/{version}: MLflow marks its registration as failed "
                                f"({mv.status_message or 'no reason given'}); register it again in MLflow")
    return mv


def fetch_model_version(tracking_uri: str, name: str, version: str | int, dest: Path) -> FetchedModel:
    """Download MLflow model version ``name``/``version`` into ``dest`` (absent or an empty
    folder; nothing is left in it on failure) and describe it from its ``MLmodel``.

    Raises SourceUnavailable (server unreachable, 5xx, version still pending: retry),
    NotFound (no such model or version), MlflowSourceError (no MLmodel, failed registration,
    credentials refused), InvalidInput (bad URI, unreadable requirements, links in the files)."""
    uri = _check_tracking_uri(tracking_uri)
    version = str(version)
    what = f"fetch MLflow model version {name}/{version}"
    with _mlflow_call(what, uri):
        client = _client(uri)
        mv = _version_info(client, name, version)
        _download(client, uri, name, version, dest)
    tags = {str(k): str(v) for k, v in (mv.tags or {}).items()}
    try:
        mlmodel = read_mlmodel(dest)
        model_file, flavor_note = sklearn_model_file(mlmodel, dest)
        flavor = Flavor.SKLEARN if model_file else None
        python: str | None = None
        if flavor is None and pyfunc_conf(mlmodel) is not None:
            flavor, model_file, flavor_note = Flavor.PYFUNC, MLMODEL, None
            env = load_pyfunc_environment(dest, MLMODEL, mlmodel)
            reqs, req_notes, python = env.requirements, env.notes, env.python
        else:
            found = load_requirements(dest)
            reqs, req_notes = found.requirements, found.notes
        sample, sample_note = read_sample(dest, mlmodel)
        expected = read_expected(dest, tags, sample, f"{name}/{version}")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    notes = tuple(n for n in (flavor_note, sample_note, *req_notes) if n)
    for note in notes:
        log.info("mlflow %s/%s: %s", name, version, note)
    return FetchedModel(
        name=name, version=version, files_dir=dest, flavor=flavor, model_file=model_file,
        requirements=reqs, sample=sample, expected=expected, python=python,
        run_id=mv.run_id or None, source=str(mv.source or ""), description=str(mv.description or ""),
        tags=tags, external_ref=f"models:/{name}/{version}", notes=notes)


def read_expected(files_dir: Path, tags: dict[str, str], sample: dict[str, Any] | None,
                  what: str) -> list[Any] | None:
    """The predictions a user gave for the version's sample: the JSON of its MLflow tag
    ``modelcd.expected``, else an ``expected.json`` among its files, else None. InvalidInput
    naming the tag or file when it is not a list of predictions for the sample."""
    text = tags.get(EXPECTED_TAG)
    if text is None:
        return files_expected(files_dir, sample)
    try:
        return parse_expected(text, sample, field="expected")
    except InvalidInput as e:
        raise InvalidInput(f"MLflow model version {what}, tag {EXPECTED_TAG}: {e.message}",
                           field="expected") from None


# --------------------------------------------------------------------------- poll


def _ref(mv: MlflowModelVersion) -> VersionRef:
    return VersionRef(name=mv.name, version=str(mv.version), creation_timestamp=int(mv.creation_timestamp or 0),
                      status=str(mv.status or _READY), source=str(mv.source or ""), run_id=mv.run_id or None,
                      tags={str(k): str(v) for k, v in (mv.tags or {}).items()},
                      description=str(mv.description or ""))


def _search_since(client: MlflowClient, floor: int | None, filter_string: str | None) -> list[VersionRef]:
    """Versions created at or after ``floor`` (all when None), newest first. MLflow cannot
    filter on creation time, so read pages newest first until one reaches below ``floor``."""
    out: list[VersionRef] = []
    token: str | None = None
    while True:
        page = client.search_model_versions(
            filter_string=filter_string, max_results=POLL_PAGE_SIZE, page_token=token,
            order_by=["creation_timestamp DESC", "name ASC", "version_number ASC"])
        refs = [_ref(mv) for mv in page]
        out.extend(r for r in refs if floor is None or r.creation_timestamp >= floor)
        token = page.token
        if not token or not refs or (floor is not None and refs[-1].creation_timestamp < floor):
            return out


def next_batch(candidates: Sequence[VersionRef], since: PollCursor | None, max_results: int,
               lookback_ms: int) -> tuple[list[VersionRef], PollCursor]:
    """Pure step of the poller: from the versions found in the window, the ones to return
    (oldest first, at most ``max_results``, none returned before) and the next cursor."""
    ordered = sorted(candidates, key=lambda r: (r.creation_timestamp, r.name, _version_key(r.version)))
    fresh = [r for r in ordered if r.status != _FAILED and not (since and since.has_seen(r))]
    batch = fresh[:max_results]
    old_ts = since.timestamp if since else 0
    if len(fresh) > len(batch):
        # stop just before the first version left for the next call
        timestamp = max(old_ts, fresh[len(batch)].creation_timestamp - 1)
    else:
        timestamp = max([old_ts, *(r.creation_timestamp for r in ordered)])
    floor = timestamp - lookback_ms
    seen = {s for s in (since.seen if since else ()) if s[2] >= floor}
    seen.update((r.name, r.version, r.creation_timestamp) for r in batch if r.creation_timestamp >= floor)
    return batch, PollCursor(timestamp, frozenset(seen))


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


def poll_new_versions(tracking_uri: str, since: PollCursor | None, max_results: int = 100, *,
                      filter_string: str | None = None,
                      lookback_ms: int = POLL_LOOKBACK_MS) -> tuple[list[VersionRef], PollCursor]:
    """Model versions registered since ``since`` (all when None), oldest first, at most
    ``max_results``, and the cursor for the next call. Each version is returned once across
    calls that chain the cursors (keep ``lookback_ms`` the same between them); versions
    whose registration failed are skipped. ``filter_string`` is MLflow's search filter,
    e.g. ``"name LIKE 'churn-%'"``. Store ``cursor.to_json()`` only after handling the batch.

    Raises SourceUnavailable (retry), InvalidInput (bad URI or filter), MlflowSourceError."""
    uri = _check_tracking_uri(tracking_uri)
    if max_results < 1:
        raise InvalidInput(f"max_results: {max_results} is not positive; ask for at least 1", field="max_results")
    floor = None if since is None else since.timestamp - lookback_ms
    with _mlflow_call("poll MLflow model versions", uri, field_name="filter_string"):
        candidates = _search_since(_client(uri), floor, filter_string)
    return next_batch(candidates, since, max_results, lookback_ms)


# --------------------------------------------------------------------------- webhooks


def _list_webhooks(client: MlflowClient) -> list[Any]:
    out: list[Any] = []
    token: str | None = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _find_webhook(client: MlflowClient, name: str) -> Any | None:
    return next((w for w in _list_webhooks(client) if w.name == name), None)


def connect_webhook(tracking_uri: str, url: str, secret: str, name: str = "modelcd",
                    events: Sequence[str] = DEFAULT_EVENTS) -> str:
    """Create the MLflow webhook ``name`` calling ``url`` for ``events``, signed with
    ``secret``, or update the one of that name (url, events, secret, status ACTIVE);
    returns its id. Idempotent; the secret never appears in logs or messages. MLflow
    servers cache webhooks (``MLFLOW_WEBHOOK_CACHE_TTL``, 60 s by default), so a change
    can take that long to apply.

    Raises InvalidInput (a URL or event the server refuses: for http or private addresses
    set MLFLOW_WEBHOOK_ALLOWED_SCHEMES / MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS on the server),
    SourceUnavailable (retry), MlflowSourceError (e.g. a server without webhooks)."""
    uri = _check_tracking_uri(tracking_uri)
    if not secret:
        raise InvalidInput("secret: the webhook needs a shared secret so modelcd can verify deliveries; set "
                           "MODELCD_HOOKS_MLFLOW_SECRET and pass it here", field="secret")
    if not events:
        raise InvalidInput("events: give at least one event, e.g. model_version.created", field="events")
    with _mlflow_call(f"connect MLflow webhook {name!r}", uri, secret=secret, field_name="url"):
        client = _client(uri)
        existing = _find_webhook(client, name)
        wanted: list[Any] = list(events)  # MLflow validates the names (typed as Literals there)
        if existing is None:
            hook = client.create_webhook(name=name, url=url, events=wanted, secret=secret,
                                         description="modelcd: deploy new model versions")
            action = "created"
        else:
            hook = client.update_webhook(existing.webhook_id, url=url, events=wanted, secret=secret,
                                         status="ACTIVE")
            action = "updated"
    log.info("mlflow webhook %r %s: id %s, %s -> %s (%s)", name, action, hook.webhook_id, redact_uri(uri),
             redact_uri(url), ", ".join(events))
    return str(hook.webhook_id)


def test_webhook(tracking_uri: str, webhook_id: str, event: str = "model_version.created") -> WebhookCheck:
    """Ask the MLflow server to send its signed example delivery of ``event`` to the
    webhook and report what the receiver answered (MLflow's example data names
    ``example_model``; the intake ignores it)."""
    uri = _check_tracking_uri(tracking_uri)
    with _mlflow_call(f"test MLflow webhook {webhook_id}", uri, field_name="webhook_id"):
        kind: Any = event
        result = _client(uri).test_webhook(webhook_id, event=kind)
    return WebhookCheck(success=bool(result.success), response_status=result.response_status,
                        response_body=result.response_body, error_message=result.error_message)


test_webhook.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported


def disconnect_webhook(tracking_uri: str, name: str = "modelcd") -> bool:
    """Delete the MLflow webhook ``name``; False when there was none (idempotent)."""
    uri = _check_tracking_uri(tracking_uri)
    with _mlflow_call(f"disconnect MLflow webhook {name!r}", uri):
        client = _client(uri)
        existing = _find_webhook(client, name)
        if existing is None:
            return False
        client.delete_webhook(existing.webhook_id)
    log.info("mlflow webhook %r deleted from %s", name, redact_uri(uri))
    return True


# --------------------------------------------------------------------------- registry write-back


def set_alias(tracking_uri: str, name: str, alias: str, version: str | int) -> None:
    """Point alias ``alias`` of registered model ``name`` at ``version``, moving it from the
    version it named (one version per alias); idempotent. Raises InvalidInput for an alias
    MLflow refuses (``latest``, ``v<digits>``, characters other than letters, digits, ``_``
    and ``-``), NotFound, SourceUnavailable (retry), MlflowSourceError."""
    uri = _check_tracking_uri(tracking_uri)
    with _mlflow_call(f"set MLflow alias {alias!r} of {name} to version {version}", uri, field_name="alias"):
        _client(uri).set_registered_model_alias(name, alias, str(version))
    log.info("mlflow %s: alias %s -> version %s", name, alias, version)


def set_version_tags(tracking_uri: str, name: str, version: str | int, tags: dict[str, str]) -> None:
    """Set ``tags`` on model version ``name``/``version`` (each overwrites a tag of that key);
    idempotent. Raises as ``set_alias``."""
    uri = _check_tracking_uri(tracking_uri)
    with _mlflow_call(f"tag MLflow model version {name}/{version}", uri, field_name="tags"):
        client = _client(uri)
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
