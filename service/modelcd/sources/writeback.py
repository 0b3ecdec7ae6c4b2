"""MLflow registry write-back, a release observer (``releases.observers``): the MLflow registry
shows what modelcd did with its versions.

- When a release of an MLflow version ends, the version gets tags: ``modelcd.release`` (the
  release id), ``modelcd.state`` (succeeded, failed or cancelled), ``modelcd.environment``,
  and what was deployed: ``modelcd.bundle`` (sha256 of the model's files) and, for images,
  ``modelcd.image`` (reference and content id).
- When a release succeeds, or a rollback makes an older deployment serve again (a rollback
  release, or the instant rollback's ``rolled_back`` event), the environment's alias
  (``MODELCD_MLFLOW_ALIAS_PREFIX`` + environment name, e.g. ``production``) is set to the
  version the endpoint serves *now*, read from the store, so a late or repeated event never
  moves it back to a version that no longer serves.

Versions from other sources are left alone. Every write is idempotent; MLflow sends its own
``model_version_tag.set`` / ``model_version_alias.created`` webhooks for them, which the
MLflow intake ignores (only ``model_version.created`` announces a version)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from modelcd.domain import ModelVersion, Source
from modelcd.errors import ConfigError, DeployError, NotFound
from modelcd.releases.deployments import load_bundle
from modelcd.releases.rollback_event import ROLLED_BACK

if TYPE_CHECKING:
    from modelcd.context import Context
    from modelcd.releases.observers import ReleaseMoved

log = logging.getLogger(__name__)

ENDED = frozenset({"succeeded", "failed", "cancelled"})  # the release phases that write tags
MOVES_ALIAS = frozenset({"succeeded", ROLLED_BACK})  # what serves may have changed
MODELS_PREFIX = "models:/"


def mlflow_version(v: ModelVersion) -> tuple[str, str] | None:
    """(MLflow model name, version) of a version imported from MLflow, else None."""
    ref = v.external_ref or ""
    if v.source != Source.MLFLOW or not ref.startswith(MODELS_PREFIX):
        return None
    name, _, version = ref[len(MODELS_PREFIX):].rpartition("/")
    return (name, version) if name and version else None


def alias_for(prefix: str, environment: str) -> str:
    """The MLflow alias that names the version serving ``environment``."""
    return f"{prefix}{environment}"


def release_tags(release_id: str, state: str, environment: str, v: ModelVersion, image: str | None = None,
                 image_id: str | None = None) -> dict[str, str]:
    """The tags a version gets when a release of it ends."""
    tags = {"modelcd.release": release_id, "modelcd.state": state, "modelcd.environment": environment,
            "modelcd.bundle": f"sha256:{v.digest}"}
    if image:
        tags["modelcd.image"] = f"{image}@{image_id}" if image_id else image
    return tags


def write_back(ctx: Context, moved: ReleaseMoved) -> None:
    """The observer: tags when a release of an MLflow version ends, the alias when what serves changed."""
    if not ctx.settings.mlflow_writeback or (moved.phase not in ENDED and moved.phase not in MOVES_ALIAS):
        return
    version = ctx.registry.get_version(moved.model, moved.version)
    ref = mlflow_version(version)
    if moved.phase in ENDED and ref is not None:
        image, image_id = _image(ctx, moved.release_id)
        tags = release_tags(moved.release_id, moved.phase, moved.environment, version, image, image_id)
        from modelcd.sources.mlflow_server import set_version_tags

        set_version_tags(_tracking_uri(ctx), ref[0], ref[1], tags)
    if moved.phase in MOVES_ALIAS:
        _move_alias(ctx, moved.model, moved.environment)


def _move_alias(ctx: Context, model: str, environment: str) -> None:
    """Point the environment's alias at the version that carries most of the endpoint's traffic."""
    try:
        weights = ctx.traffic.get(model, environment).versions
    except NotFound:
        return
    live = sorted((v for v, w in weights.items() if w > 0), key=lambda v: (-weights[v], -v))
    if not live:
        return
    ref = mlflow_version(ctx.registry.get_version(model, live[0]))
    if ref is None:
        return  # serving a version MLflow does not know
    from modelcd.sources.mlflow_server import set_alias

    set_alias(_tracking_uri(ctx), ref[0], alias_for(ctx.settings.mlflow_alias_prefix, environment), ref[1])


def _image(ctx: Context, release_id: str) -> tuple[str | None, str | None]:
    """The scoring image the release built (docker target), if any."""
    try:
        bundle = ctx.releases.get(release_id).bundle
        if not bundle:
            return None, None
        built = load_bundle(bundle)
    except (NotFound, DeployError) as e:  # a release that failed before its build has nothing to name
        log.debug("release %s: no bundle to describe (%s)", release_id, e)
        return None, None
    return built.image, built.image_id


def _tracking_uri(ctx: Context) -> str:
    uri = ctx.settings.mlflow_tracking_uri
    if not uri:
        raise ConfigError("MLflow write-back: MODELCD_MLFLOW_TRACKING_URI is not set; set it (or run `modelcd "
                          "sources connect mlflow`), or turn write-back off with MODELCD_MLFLOW_WRITEBACK=false",
                          field="mlflow_tracking_uri")
    return uri
