"""`modelcd sources connect mlflow`: make (or update) the MLflow webhook that calls this
service's ``/hooks/mlflow``, keep its secret and the tracking URI in
``$MODELCD_HOME/settings.yaml`` (mode 0600), and, when a running service does it (``POST
/api/v1/sources/mlflow/connect``), use them at once: ``reload_sources`` gives the service's
context the values a restart would read, and the webhook intake's MLflow adapter, which it
keeps between requests, the same settings. Without a service the CLI does the first two
steps itself and the next ``modelcd serve`` reads the file."""

from __future__ import annotations

import logging
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelcd.config import Settings, load_settings, save_home_settings

if TYPE_CHECKING:
    from modelcd.context import Context
    from modelcd.inbox.intake import Intake

log = logging.getLogger(__name__)

LIVE_KEYS = ("hooks_mlflow_secret", "mlflow_tracking_uri")  # what `sources connect mlflow` changes


@dataclass(frozen=True)
class Connected:
    """What ``connect_mlflow`` did (the secret is never part of it)."""

    webhook_id: str
    tracking_uri: str
    hook_url: str  # where MLflow now posts model_version.created
    settings_path: Path
    overridden: tuple[str, ...] = ()  # settings whose saved value the environment or MODELCD_CONFIG overrides

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["settings_path"] = str(self.settings_path)
        d["overridden"] = list(self.overridden)
        return d


def connect_mlflow(settings: Settings, tracking_uri: str, public_url: str | None = None) -> Connected:
    """Create or update the MLflow webhook calling ``public_url`` (default ``settings.url``)
    ``/hooks/mlflow`` with the secret already set (or a new one), then save the secret and
    the tracking URI in the home's settings.yaml. Raises as ``mlflow_server.connect_webhook``."""
    from modelcd.sources.mlflow_server import connect_webhook, redact_uri

    secret = settings.hooks_mlflow_secret or secrets.token_urlsafe(32)
    target = f"{(public_url or settings.url).rstrip('/')}/hooks/mlflow"
    webhook_id = connect_webhook(tracking_uri, target, secret)  # checks the URI first
    uri = tracking_uri.rstrip("/")
    path = save_home_settings(settings.home, {"hooks_mlflow_secret": secret, "mlflow_tracking_uri": uri})
    return Connected(webhook_id=webhook_id, tracking_uri=redact_uri(uri), hook_url=target, settings_path=path)


def reload_sources(ctx: Context, intake: Intake | None = None, wanted: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Give the running service the current values of ``LIVE_KEYS``, read as a start would
    (settings.yaml, then ``MODELCD_CONFIG``, then the environment, which win over the file);
    return the keys whose value differs from ``wanted`` (overridden there)."""
    fresh = load_settings({"home": ctx.settings.home})
    updates = {key: getattr(fresh, key) for key in LIVE_KEYS}
    ctx.settings = ctx.settings.model_copy(update=updates)
    if updates["hooks_mlflow_secret"]:
        ctx.redact.add(updates["hooks_mlflow_secret"])
    if intake is not None:
        intake.adapter("mlflow").settings = ctx.settings  # the intake keeps one adapter per source
    log.info("mlflow source settings reloaded (tracking URI %s)", updates["mlflow_tracking_uri"])
    return tuple(k for k, v in (wanted or {}).items() if updates.get(k) != v)
