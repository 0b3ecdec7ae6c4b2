"""Turning a normalised external event into a registry version: fetch the files where they
can be reached (MLflow ``models:/``, S3 folders, SageMaker ``model.tar.gz``, Azure ML model
versions), otherwise record the version as referenced only. Imports are idempotent per
external version."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from modelcd.context import Context
from modelcd.domain import Flavor, ModelVersion, Source
from modelcd.errors import ArtifactStoreError, InvalidInput
from modelcd.fsutil import scratch_dir
from modelcd.registry.archive import safe_extract
from modelcd.registry.service import RegisterMetadata


def event_metadata(event: Any) -> RegisterMetadata:
    """What a ``sources.base.Registered`` event says about its version besides the files."""
    return RegisterMetadata(tags=dict(event.tags), description=event.description or "", source=Source(event.source),
                            external_ref=event.external_ref, release=event.release)


def import_event(ctx: Context, event: Any) -> ModelVersion:
    """Record ``event`` (a ``sources.base.Registered``) as a version of ``event.model``."""
    meta = event_metadata(event)
    existing = ctx.registry.find_external(event.model, meta)
    if existing is not None:
        if event.release:  # e.g. recorded while pending approval, approved now
            ctx.registry.release_later(existing)
        return existing
    uri = event.artifact_uri
    if not uri:
        return ctx.registry.register_reference(event.model, meta)
    with scratch_dir(ctx.home / "tmp", "import") as work:  # locked: a start-up cleaner leaves it alone
        files = work / "files"
        if uri.startswith("models:/"):
            meta = _fetch_mlflow(ctx, uri, files, meta)
        elif uri.startswith("s3://"):
            _fetch_s3(ctx, uri, files, work)
        elif uri.startswith("azureml:"):
            meta = _fetch_azureml(ctx, uri, files, meta)
        else:
            raise InvalidInput(f"cannot fetch artifacts from {uri!r}: modelcd reads models:/ (MLflow), s3:// and "
                               "azureml: (Azure ML model version) URIs", field="artifact_uri")
        version = ctx.registry.import_files(event.model, files, meta)
        from modelcd.jobs.statistics import statistics_after_import

        statistics_after_import(ctx, version, files)  # training data among the files: its statistics, as a job
        return version


def _fetch_mlflow(ctx: Context, uri: str, dest: Path, meta: RegisterMetadata) -> RegisterMetadata:
    from modelcd.sources.mlflow_server import EXPECTED_TAG, fetch_model_version

    tracking = ctx.settings.mlflow_tracking_uri
    if not tracking:
        raise InvalidInput("an MLflow version arrived but MODELCD_MLFLOW_TRACKING_URI is not set; set it to the "
                           "MLflow server's URL", field="mlflow_tracking_uri")
    name, _, version = uri[len("models:/"):].rpartition("/")
    fetched = fetch_model_version(tracking, name, version, dest)
    tags = {k: v for k, v in {**fetched.tags, **meta.tags}.items() if k != EXPECTED_TAG}  # JSON, not a label
    requirements = list(fetched.requirements)
    if fetched.flavor is not Flavor.PYFUNC:
        # the sklearn/onnx runtime loads the model itself: MLflow is not needed at serving time
        requirements = [r for r in requirements if _req_name(r) not in ("mlflow", "mlflow-skinny")]
    return meta.model_copy(update={
        "flavor": str(fetched.flavor) if fetched.flavor else None,
        "requirements": "\n".join(requirements) + "\n" if requirements else None,
        "sample": fetched.sample, "expected": meta.expected if meta.expected is not None else fetched.expected,
        "tags": tags, "description": meta.description or fetched.description or ""})


def _req_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _fetch_azureml(ctx: Context, uri: str, dest: Path, meta: RegisterMetadata) -> RegisterMetadata:
    """An Azure ML model version: its datastore blobs, with its tags and description."""
    from modelcd.sources.azureml_fetch import fetch_model_version as fetch_azureml

    fetched = fetch_azureml(ctx.settings, uri, dest)
    return meta.model_copy(update={"tags": {**fetched.info.tags, **meta.tags},
                                   "description": meta.description or fetched.info.description})


def _s3_client(ctx: Context) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=ctx.settings.s3_endpoint_url, region_name=ctx.settings.s3_region)


def _fetch_s3(ctx: Context, uri: str, dest: Path, work: Path) -> None:
    """An ``s3://bucket/prefix/`` folder, or one ``.tar.gz`` object (SageMaker's ModelDataUrl)."""
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    client = _s3_client(ctx)
    try:
        if key.endswith((".tar.gz", ".tgz")):
            archive = work / "model.tar.gz"
            client.download_file(bucket, key, str(archive))
            with archive.open("rb") as f:
                safe_extract(f, dest, ctx.settings.max_artifact_bytes)
            return
        prefix = key if key.endswith("/") else key + "/"
        dest.mkdir(parents=True)
        paginator = client.get_paginator("list_objects_v2")
        total = 0
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue
                target = (dest / rel).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise InvalidInput(f"s3 object {obj['Key']!r} escapes its model folder", field="artifact_uri")
                total += int(obj.get("Size", 0))
                if total > ctx.settings.max_artifact_bytes:
                    raise InvalidInput(f"{uri}: over MODELCD_MAX_ARTIFACT_BYTES", field="artifact_uri")
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(target))
        if not any(dest.iterdir()):
            raise InvalidInput(f"{uri}: no objects under that prefix", field="artifact_uri")
    except (BotoCoreError, ClientError) as e:
        raise ArtifactStoreError(f"cannot fetch {uri}: {type(e).__name__}: {e}") from e
