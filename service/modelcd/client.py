"""A small HTTP client of the modelcd API, used by the CLI (which stays thin over REST)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from modelcd.auth import find_token
from modelcd.config import Settings
from modelcd.errors import ModelcdError

TERMINAL_PHASES = {"succeeded", "failed", "cancelled", "superseded"}
GATE_PHASE = "awaiting_approval"  # a release waits here for a person; waiting clients stop too


def api_path(*segments: str | int) -> str:
    """``/api/v1/`` and the segments, each percent-encoded whole: a name or id holding ``/``,
    ``?`` or ``#`` stays one segment (the API refuses it) and can never reach another route."""
    parts = []
    for segment in segments:
        text = str(segment)
        if text in ("", ".", ".."):  # dot segments are removed by URL normalisation, not encoded
            raise ModelcdError(f"{text!r} is not a valid name or id in an API path")
        parts.append(quote(text, safe=""))
    return "/api/v1/" + "/".join(parts)


class ApiError(ModelcdError):
    """The service answered with an error (its message names the field and the fix)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status
        self.code = code


class Client:
    def __init__(self, settings: Settings, timeout: float = 60.0) -> None:
        self.base = settings.url
        self.token = find_token(settings)
        self.timeout = timeout
        self.session = requests.Session()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = f"{self.base}{path}"
        try:
            resp = self.session.request(method, url, headers=headers, timeout=kwargs.pop("timeout", self.timeout),
                                        **kwargs)
        except requests.ConnectionError:
            raise ModelcdError(f"cannot reach the modelcd service at {self.base}: start it with `modelcd serve` "
                               "(or point MODELCD_URL at it)") from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"code": "http_error", "message": resp.text[:500]}
            raise ApiError(resp.status_code, body.get("code", "error"), body.get("message", resp.reason),
                           body.get("field"))
        return resp.json() if resp.content else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def register(self, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Upload ``path`` (file or folder, packed as tar.gz) as a new version of ``name``."""
        from modelcd.registry.archive import pack_tree

        return self.post(api_path("models", name, "versions"),
                         files={"artifact": ("artifact.tar.gz", pack_tree(path), "application/gzip")},
                         data={"metadata": json.dumps(meta)})

    def upload_statistics(self, name: str, version: int, path: Path) -> dict[str, Any]:
        """Upload training data (CSV, Parquet, JSON lines) for version ``version`` of ``name``;
        returns the `statistics` job computing its statistics."""
        with path.open("rb") as f:
            return self.post(api_path("models", name, "versions", version, "statistics"),
                             files={"data": (path.name, f, "application/octet-stream")})

    def wait_job(self, job_id: str, timeout_s: float = 900, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll a job until it ends (succeeded, failed, cancelled); returns it. Every 50 ms for
        its first 5 seconds (a short job's end is seen at once), then every ``poll_s``."""
        started = time.monotonic()
        while True:
            job = self.get(api_path("jobs", job_id))
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            waited = time.monotonic() - started
            if waited > timeout_s:
                raise ModelcdError(f"job {job_id} still {job['state']} after {timeout_s:.0f} s")
            time.sleep(min(poll_s, 0.05) if waited < 5.0 else poll_s)

    def healthy(self) -> bool:
        try:
            return self.session.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_release(self, release_id: str, on_change: Callable[[dict[str, Any]], None] | None = None,
                     timeout_s: float = 900, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll a release until it is terminal or waits at its approval gate, calling
        ``on_change`` when its phase changes."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            rel = self.get(api_path("releases", release_id))
            if rel["phase"] != last:
                last = rel["phase"]
                if on_change:
                    on_change(rel)
            if rel["phase"] in TERMINAL_PHASES or rel["phase"] == GATE_PHASE:
                return rel
            if time.monotonic() > deadline:
                raise ModelcdError(f"release {release_id} still {rel['phase']} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def find_release(self, model: str, version: int, timeout_s: float = 15) -> dict[str, Any] | None:
        """The release the dispatcher started for a freshly registered version, if any."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rel in self.get("/api/v1/releases", params={"model": model})["releases"]:
                if rel["version"] == version:
                    return rel
            time.sleep(0.1)
        return None
