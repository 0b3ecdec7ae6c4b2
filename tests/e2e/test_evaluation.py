"""Evaluation end to end with a real `modelcd serve` and real scoring: `modelcd evaluate --wait`
of a local CSV stores the metrics that `modelcd versions show` prints; then a policy with an
evaluation gate on a moto S3 object: a worse v2 fails its release with the figures (production
stays on v1), a v3 as good as the champion passes, using the champion's stored result."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import joblib
import pandas as pd
import pytest
from sklearn.datasets import load_iris

from tests.conftest import Service, iris_model, running_service
from tests.e2e.test_batch_schedule import cli
from tests.registry.conftest import aws_env, moto_endpoint  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def serving_versions(svc: Service) -> set[int]:
    return {int(v) for v, weight in svc.endpoint("iris")["traffic"].items() if weight > 0}


@pytest.mark.timeout(240)
def test_evaluate_then_an_evaluation_gate_fails_a_worse_version(tmp_path: Path, moto_endpoint: str,  # noqa: F811
                                                                  aws_env: None) -> None:  # noqa: F811
    x, y = load_iris(return_X_y=True)
    data = pd.DataFrame(x, columns=COLUMNS)
    data["species"] = y
    data.to_csv(tmp_path / "iris.csv", index=False)
    bucket = f"eval-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="iris.csv", Body=(tmp_path / "iris.csv").read_bytes())
    v1 = iris_model(tmp_path / "v1", c=1.0)
    accuracy_v1 = float((joblib.load(tmp_path / "v1" / "model.joblib").predict(x) == y).mean())

    with running_service(tmp_path, MODELCD_S3_ENDPOINT_URL=moto_endpoint) as svc:
        svc.register("iris", tmp_path / "v1", v1)
        assert svc.wait_release_for("iris", 1)["phase"] == "succeeded"

        # evaluate --wait of a local CSV: the metrics printed, stored, shown by versions show
        out = cli(svc, "evaluate", "iris", "1", "--data", str(tmp_path / "iris.csv"), "--label", "species",
                  "--wait").stdout
        assert f"accuracy {accuracy_v1:.4g}" in out and "on 150 rows of" in out, out
        assert "confusion matrix (rows: true, columns: predicted)" in out, out
        shown = cli(svc, "versions", "show", "iris", "1").stdout
        assert "evaluations:" in shown and f"accuracy {accuracy_v1:.4g}" in shown, shown
        doc = svc.api("GET", "/models/iris/versions/1").json()
        assert doc["evaluations"][0]["metrics"]["accuracy"] == pytest.approx(accuracy_v1)
        bad = cli(svc, "evaluate", "iris", "1", "--data", str(tmp_path / "iris.csv"), "--label", "species",
                  "--metrics", "accuracy,rmse", check=False)
        assert bad.returncode == 1 and "mixes classification" in bad.stderr and "[metrics]" in bad.stderr, bad

        # the gate: v2 (C=0.003, accuracy ~0.79) fails before anything is deployed
        data_uri = f"s3://{bucket}/iris.csv"
        svc.apply_policy(f"""
name: gated
gates:
  evaluation: {{data: "{data_uri}", label: species, metric: accuracy, min: 0.9, max_drop_vs_champion: 0.01,
               max_age_s: 3600}}
""")
        plan = cli(svc, "releases", "plan", "iris", "1").stdout
        assert f"evaluate:  accuracy >= 0.9, at most 0.01 below the champion's on {data_uri}" in plan, plan
        svc.register("iris", tmp_path / "v2", iris_model(tmp_path / "v2", c=0.003))
        rel = svc.wait_release_for("iris", 2)
        log = svc.job_log(rel["id"])
        assert rel["phase"] == "failed", log
        assert f"evaluate failed: evaluation gate failed: accuracy 0.7933 < min 0.9; accuracy 0.7933 < champion " \
               f"{accuracy_v1:.4g} - 0.01 (data {data_uri}, 150 rows)" in rel["error"], rel["error"]
        assert "deploy" not in {j["type"] for j in svc.release_detail(rel["id"])["jobs"]}
        assert serving_versions(svc) == {1}
        gate_events = [e["message"] for e in svc.release_detail(rel["id"])["events"] if e["kind"] == "evaluation.gate"]
        assert gate_events and gate_events[0].startswith("failed: v2 accuracy 0.7933, champion v1"), gate_events

        # v3 (C=0.9) is as good: passes, the champion's S3 figure reused from v2's release
        svc.register("iris", tmp_path / "v3", iris_model(tmp_path / "v3", c=0.9))
        rel = svc.wait_release_for("iris", 3)
        log = svc.job_log(rel["id"])
        assert rel["phase"] == "succeeded", (rel["error"], log)
        assert "v1: using the stored evaluation of" in log and "evaluation gate passed: v3 accuracy" in log, log
        assert serving_versions(svc) == {3}
        stored = svc.api("GET", "/models/iris/versions/3/evaluations").json()["evaluations"]
        assert stored[0]["data"] == data_uri and stored[0]["data_digest"].startswith("sha256:")
