"""MLflow write-back: which versions and tags (pure functions), and the alias and tag writes
against a real MLflow tracking server (an alias moves, a reserved one is refused by name)."""

from __future__ import annotations

import pytest

from modelcd.domain import Flavor, ModelVersion, Source
from modelcd.errors import InvalidInput
from modelcd.sources.mlflow_server import SourceUnavailable, set_alias, set_version_tags
from modelcd.sources.writeback import alias_for, mlflow_version, release_tags
from modelcd.targets.process import free_port
from tests.sources.mlflow_fixture import MlflowServer, mlflow_server_fixture  # noqa: F401


def _version(source: Source = Source.MLFLOW, ref: str | None = "models:/churn/7") -> ModelVersion:
    return ModelVersion(model="churn", version=2, digest="ab" * 32, flavor=Flavor.SKLEARN, model_file="model.pkl",
                        entry_script=None, requirements=(), sample=None, expected=None, source=source,
                        external_ref=ref)


def test_only_mlflow_versions_are_written_back() -> None:
    assert mlflow_version(_version()) == ("churn", "7")
    assert mlflow_version(_version(ref="models:/team/churn/12")) == ("team/churn", "12")
    assert mlflow_version(_version(Source.NATIVE, None)) is None
    assert mlflow_version(_version(Source.S3, "s3://bucket/models/churn/2/")) is None
    assert mlflow_version(_version(ref="models:/m-abc")) is None  # not a registered version


def test_alias_and_tags() -> None:
    assert alias_for("", "production") == "production"
    assert alias_for("modelcd-", "staging") == "modelcd-staging"
    assert release_tags("r_1", "succeeded", "production", _version()) == {
        "modelcd.release": "r_1", "modelcd.state": "succeeded", "modelcd.environment": "production",
        "modelcd.bundle": "sha256:" + "ab" * 32}
    tags = release_tags("r_1", "failed", "production", _version(), "modelcd/churn:2-abab", "sha256:ff")
    assert tags["modelcd.image"] == "modelcd/churn:2-abab@sha256:ff" and tags["modelcd.state"] == "failed"


@pytest.mark.slow
def test_alias_moves_and_tags_are_set_in_mlflow(mlflow_server: MlflowServer) -> None:
    client = mlflow_server.client()
    name = mlflow_server.unique_name("aliased")
    first = mlflow_server.register_sklearn(name, C=1.0)
    second = mlflow_server.register_sklearn(name, C=0.5)
    uri = mlflow_server.tracking_uri
    set_alias(uri, name, "production", first)
    set_alias(uri, name, "production", second)
    set_alias(uri, name, "production", second)  # idempotent
    assert client.get_model_version_by_alias(name, "production").version == second
    assert "production" not in client.get_model_version(name, first).aliases
    set_version_tags(uri, name, second, {"modelcd.release": "r_1", "modelcd.state": "succeeded"})
    set_version_tags(uri, name, second, {"modelcd.state": "failed"})
    tags = client.get_model_version(name, second).tags
    assert tags["modelcd.release"] == "r_1" and tags["modelcd.state"] == "failed"
    with pytest.raises(InvalidInput) as e:
        set_alias(uri, name, "latest", first)
    assert "reserved" in e.value.message and e.value.field == "alias"


def test_an_unreachable_server_is_retryable() -> None:
    with pytest.raises(SourceUnavailable):
        set_alias(f"http://127.0.0.1:{free_port()}", "churn", "production", 1)
