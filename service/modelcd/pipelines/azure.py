"""Azure DevOps REST API client for release pipelines on Azure Pipelines (``reference/integrations.md`` §6).

- ``run_pipeline`` starts a run of a YAML pipeline through the Runs API with
  ``templateParameters`` (sent as strings) and optional queue-time ``variables``;
  ``get_run`` polls it and ``timeline`` reads its records, which ``stage_outcome`` turns
  into modelcd's stage outcomes (a Pipelines run id is also its build id).
- ``trigger_webhook`` posts to an Incoming WebHook service connection instead: that endpoint
  is public and unauthenticated, so the personal access token is not sent there; the body
  is signed with HMAC-SHA1 (``sha1=<hex>`` in the configured header) when a secret is given.

Auth is the PAT as Basic (``base64(":" + PAT)``), scope Build: Read & execute. Everything the
API refuses is a ``PipelineApiError`` (see ``pipelines/http.py`` for the retries); neither
the PAT, its Basic form nor a webhook secret appears in a message, a log line or a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import requests

from modelcd.errors import InvalidInput
from modelcd.pipelines.http import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_WAIT,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    USER_AGENT,
    ApiClient,
    JsonHttp,
    Outcome,
    PipelineApiError,
    as_string,
    basic_credential,
    check_base_url,
    check_stage_map,
    compact_json,
    positive_id,
    segment,
    stage_result,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

API_VERSION = "7.1"
WEBHOOK_API_VERSION = "6.0-preview"
SIGNATURE_HEADER = "X-Hub-Signature"
MISSING_WEBHOOK = "cannot find webhook"

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_API_VERSION = re.compile(r"^\d+\.\d+(-preview(\.\d+)?)?$")

HINTS = {
    203: "Azure DevOps answers a sign-in page when it does not accept the personal access token: check the PAT",
    400: "Azure DevOps refused the request: templateParameters must match the pipeline's YAML parameters, and "
         "variables must be settable at queue time",
    401: "the personal access token is missing, wrong or expired; give a valid PAT",
    403: "the personal access token lacks the scope Build: Read & execute (vso.build_execute) for this project",
    404: "the organization, project, pipeline or run does not exist, or the token cannot see it",
}
NOT_JSON = ("Azure DevOps answers a sign-in page when it does not accept the personal access token: check that "
            "the PAT is valid and has the scope Build: Read & execute")

_STATE: dict[str, Outcome] = {"pending": "pending", "notStarted": "pending", "inProgress": "running"}
_RESULT: dict[str, Outcome] = {
    "succeeded": "succeeded", "succeededWithIssues": "succeeded", "failed": "failed", "canceled": "cancelled",
    "abandoned": "cancelled", "skipped": "skipped",
}


@dataclass(frozen=True)
class PipelineRun:
    """A run of an Azure Pipelines pipeline. ``state`` is ``unknown|inProgress|canceling|
    completed``; ``result`` is None until it completes, then ``succeeded|failed|canceled``
    (or ``unknown``). ``web_url`` is the run's page (``_links.web.href``)."""

    id: int
    name: str
    state: str
    result: str | None
    web_url: str
    created_date: datetime | None
    finished_date: datetime | None = None
    pipeline_id: int | None = None

    @property
    def completed(self) -> bool:
        return self.state == "completed"


@dataclass(frozen=True)
class TimelineRecord:
    """One record of a build timeline. ``type`` is ``Stage``, ``Phase``, ``Job``, ``Task``...;
    ``identifier`` is the YAML name of a stage or job, ``name`` its display name; ``state``
    is ``pending|inProgress|completed`` and ``result`` (once completed) ``succeeded|
    succeededWithIssues|failed|canceled|skipped|abandoned``."""

    type: str
    name: str
    identifier: str | None
    state: str
    result: str | None
    id: str = ""
    parent_id: str | None = None
    order: int | None = None


def webhook_signature(secret: str, body: bytes) -> str:
    """The checksum header value an Azure DevOps Incoming WebHook checks: ``sha1=`` and the
    lowercase hex HMAC-SHA1 of the exact body bytes with the secret as key."""
    return "sha1=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha1).hexdigest()


def _dt(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _pipeline_run(doc: Any) -> PipelineRun:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("id"), int):
        raise ValueError("not a pipeline run")
    links = doc.get("_links")
    web = links.get("web") if isinstance(links, Mapping) else None
    pipeline = doc.get("pipeline")
    pid = pipeline.get("id") if isinstance(pipeline, Mapping) else None
    return PipelineRun(id=doc["id"], name=str(doc.get("name") or ""), state=str(doc.get("state") or ""),
                       result=doc.get("result") or None,
                       web_url=str(web.get("href") or "") if isinstance(web, Mapping) else "",
                       created_date=_dt(doc.get("createdDate")), finished_date=_dt(doc.get("finishedDate")),
                       pipeline_id=pid if isinstance(pid, int) else None)


def _record(doc: Any) -> TimelineRecord:
    if not isinstance(doc, Mapping):
        raise ValueError("not a timeline record")
    order = doc.get("order")
    return TimelineRecord(type=str(doc.get("type") or ""), name=str(doc.get("name") or ""),
                          identifier=doc.get("identifier") or None, state=str(doc.get("state") or ""),
                          result=doc.get("result") or None, id=str(doc.get("id") or ""),
                          parent_id=doc.get("parentId") or None, order=order if isinstance(order, int) else None)


class AzureDevOpsClient(ApiClient):
    """The Azure DevOps REST API for one project. ``organization_url`` is
    ``https://dev.azure.com/<org>`` (or ``https://<org>.visualstudio.com``, or an Azure
    DevOps Server collection URL); ``token`` a personal access token with the scope Build:
    Read & execute. ``timeout`` is per attempt; ``retries`` the attempts after the first;
    ``max_wait`` caps a wait the server asks for."""

    def __init__(self, organization_url: str, project: str, token: str, api_version: str = API_VERSION, *,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 sleep: Callable[[float], None] = time.sleep, backoff: float = DEFAULT_BACKOFF,
                 max_wait: float = DEFAULT_MAX_WAIT, session: requests.Session | None = None) -> None:
        if not isinstance(project, str) or not project.strip():
            raise InvalidInput("project: give the Azure DevOps project name or id", field="project")
        if not isinstance(token, str) or not token.strip():
            raise InvalidInput("token: an Azure DevOps personal access token is required (scope Build: Read & "
                               "execute)", field="token")
        if not isinstance(api_version, str) or not _API_VERSION.match(api_version):
            raise InvalidInput(f"api_version: {api_version!r} is not an Azure DevOps API version like 7.1",
                               field="api_version")
        self.organization_url = check_base_url(organization_url, "organization_url")
        self.project = project
        self.api_version = api_version
        credential = basic_credential("", token)
        self._http = JsonHttp(
            self.organization_url, service="Azure DevOps",
            headers={"Authorization": credential, "Accept": "application/json", "User-Agent": USER_AGENT},
            secrets=(token, credential, credential.removeprefix("Basic ")), timeout=timeout, retries=retries,
            backoff=backoff, max_wait=max_wait, sleep=sleep, session=session, hints=HINTS, not_json_hint=NOT_JSON)

    def __repr__(self) -> str:
        return f"AzureDevOpsClient({self.organization_url!r}, project={self.project!r})"

    @property
    def _project_path(self) -> str:
        return f"/{segment(self.project)}/_apis"

    # ----------------------------------------------------------------------- runs

    def run_pipeline(self, pipeline_id: int, template_parameters: Mapping[str, Any] | None = None,
                     branch: str = "main", variables: Mapping[str, Any] | None = None,
                     secret_variables: Mapping[str, str] | None = None) -> PipelineRun:
        """Start pipeline ``pipeline_id`` on ``branch`` (a name or ``refs/...``) with
        ``template_parameters`` (keys as in the YAML ``parameters:``, values sent as strings)
        and queue-time ``variables`` (only ones marked settable at queue time); returns the
        new run. A timeout is not retried (the run may have started): the PipelineApiError
        is ``ambiguous``."""
        pid = positive_id(pipeline_id, "pipeline_id")
        if not isinstance(branch, str) or not branch.strip():
            raise InvalidInput("branch: give the branch to run, e.g. main", field="branch")
        ref = branch if branch.startswith("refs/") else f"refs/heads/{branch}"
        body: dict[str, Any] = {
            "resources": {"repositories": {"self": {"refName": ref}}},
            "templateParameters": _strings(template_parameters or {}, "template_parameters"),
        }
        if variables or secret_variables:
            body["variables"] = {k: {"value": v, "isSecret": False}
                                 for k, v in _strings(variables or {}, "variables").items()}
            # secret values (the per-release token): masked in Azure's logs, redacted from our errors
            body["variables"].update({k: {"value": v, "isSecret": True}
                                      for k, v in _strings(secret_variables or {}, "secret_variables").items()})
        body.update({"stagesToSkip": [], "previewRun": False})
        path = f"{self._project_path}/pipelines/{pid}/runs"
        reply = self._http.call("POST", path, params={"api-version": self.api_version}, body=body,
                                what=f"run pipeline {pid} on {ref}",
                                secrets=tuple((secret_variables or {}).values()))
        run = self._parse(reply.body, _pipeline_run, "POST", path, "a pipeline run")
        log.info("azure devops %s: started pipeline %d on %s: run %d", self.project, pid, ref, run.id)
        return run

    def get_run(self, pipeline_id: int, run_id: int) -> PipelineRun:
        """Run ``run_id`` of pipeline ``pipeline_id`` as it is now."""
        pid, rid = positive_id(pipeline_id, "pipeline_id"), positive_id(run_id, "run_id")
        path = f"{self._project_path}/pipelines/{pid}/runs/{rid}"
        reply = self._http.call("GET", path, params={"api-version": self.api_version},
                                what=f"get run {rid} of pipeline {pid}")
        return self._parse(reply.body, _pipeline_run, "GET", path, "a pipeline run")

    def timeline(self, build_id: int) -> list[TimelineRecord]:
        """The timeline records (stages, phases, jobs, tasks) of build ``build_id`` (a
        Pipelines run id); empty while the run has none yet."""
        bid = positive_id(build_id, "build_id")
        path = f"{self._project_path}/build/builds/{bid}/timeline"
        reply = self._http.call("GET", path, params={"api-version": self.api_version}, ok=(200, 204),
                                what=f"get the timeline of build {bid}")
        if reply.body is None:
            return []
        records = reply.body.get("records") if isinstance(reply.body, Mapping) else None
        if records is None and isinstance(reply.body, Mapping):
            return []
        if not isinstance(records, list):
            raise self._bad_answer("GET", path, "a timeline")
        return [self._parse(r, _record, "GET", path, "a timeline") for r in records]

    # ----------------------------------------------------------------------- incoming webhook

    def trigger_webhook(self, webhook_name: str, payload: Mapping[str, Any] | bytes, secret: str | None = None,
                        header: str = SIGNATURE_HEADER) -> None:
        """POST ``payload`` (compact JSON, or the given bytes as they are) to the Incoming
        WebHook ``webhook_name``; every pipeline subscribed to it gets a run (no run id comes
        back). With ``secret``, ``header`` carries ``sha1=<HMAC-SHA1 of the exact bytes>``.
        The PAT is not sent: the endpoint is public. Not re-sent after a timeout."""
        if not isinstance(webhook_name, str) or not _NAME.match(webhook_name):
            raise InvalidInput(f"webhook_name: {webhook_name!r} is not a webhook name (letters, digits, . _ -)",
                               field="webhook_name")
        if not isinstance(header, str) or not _HEADER.match(header):
            raise InvalidInput(f"header: {header!r} is not an HTTP header name", field="header")
        if isinstance(payload, bytes):
            raw = payload
        elif isinstance(payload, Mapping):
            raw = compact_json(dict(payload), "payload")
        else:
            raise InvalidInput("payload: must be a JSON object or its bytes", field="payload")
        headers: dict[str, str | None] = {"Authorization": None}
        if secret:
            headers[header] = webhook_signature(secret, raw)
        path = f"/_apis/public/distributedtask/webhooks/{segment(webhook_name)}"

        def missing_webhook(status: int, body: Any) -> str | None:
            message = str(body.get("message") or "") if isinstance(body, Mapping) else ""
            if MISSING_WEBHOOK in message.lower():
                return ("the pipeline that declares this webhook resource must be on its default branch and have "
                        "run once; check the service connection's WebHook Name")
            return None

        self._http.call("POST", path, params={"api-version": WEBHOOK_API_VERSION}, raw=raw, headers=headers,
                        what=f"trigger webhook {webhook_name!r}", secrets=(secret,) if secret else (),
                        not_retried=missing_webhook)
        log.info("azure devops: triggered webhook %r", webhook_name)

    # ----------------------------------------------------------------------- helpers

    def _parse(self, doc: Any, parse: Callable[[Any], T], method: str, path: str, expected: str) -> T:
        try:
            return parse(doc)
        except ValueError:
            raise self._bad_answer(method, path, expected) from None

    def _bad_answer(self, method: str, path: str, expected: str) -> PipelineApiError:
        full = self._http.base_path + path
        return PipelineApiError(f"Azure DevOps: {method} {full} answered 200 but not with {expected}",
                                method=method, path=full, status=200, retryable=False)


def _strings(values: Mapping[str, Any], field: str) -> dict[str, str]:
    if not isinstance(values, Mapping):
        raise InvalidInput(f"{field}: must be a mapping of names to values", field=field)
    out: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput(f"{field}: {name!r} is not a name", field=field)
        out[name] = as_string(value, f"{field}.{name}")
    return out


# --------------------------------------------------------------------------- stage outcomes


def record_outcome(record: TimelineRecord) -> Outcome:
    """One timeline record's state and result as a stage outcome."""
    if record.state == "completed":
        return _RESULT.get(record.result or "", "failed")
    return _STATE.get(record.state, "pending")


def stage_outcome(records: Sequence[TimelineRecord], stage_names: Mapping[str, str],
                  run: PipelineRun | None = None) -> dict[str, Outcome]:
    """Each stage of ``stage_names`` (stage -> YAML stage name, e.g. ``{"build": "Build"}``)
    with its outcome ``pending|running|succeeded|failed|skipped|cancelled``, from the
    ``Stage`` records whose ``identifier`` (or, failing that, display ``name``) matches.

    Without ``run``, or while it runs, a stage with no record is pending. Once ``run`` has
    completed, a stage with no record was skipped (cancelled if the run was), and one still
    unfinished failed (or was cancelled with the run)."""
    check_stage_map(stage_names, "stage_names")
    stages = [r for r in records if r.type == "Stage"]
    done = run is not None and run.completed
    cancelled = run is not None and run.result == "canceled"
    out: dict[str, Outcome] = {}
    for stage, name in stage_names.items():
        mine = [r for r in stages if r.identifier == name] or [r for r in stages if r.name == name]
        out[stage] = stage_result([record_outcome(r) for r in mine], done, cancelled)
    return out
