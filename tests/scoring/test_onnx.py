"""The onnx flavor: an iris classifier converted with skl2onnx, served by onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import COLUMNS, Iris, Launcher

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_model_dir(tmp_path_factory: pytest.TempPathFactory, iris: Iris) -> Path:
    """LogisticRegression on iris as ``model.onnx`` (float input of shape [None, 4])."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=500).fit(iris.x, iris.y)
    folder = tmp_path_factory.mktemp("onnx-model")
    (folder / "model.onnx").write_bytes(to_onnx(model, iris.x[:1].astype("float32")).SerializeToString())
    return folder


def test_onnx_model_scores_like_sklearn(start_server: Launcher, onnx_model_dir: Path, iris: Iris) -> None:
    config = {
        "model": "iris-onnx",
        "version": 1,
        "flavor": "onnx",
        "model_file": "model.onnx",
        "sample": {"data": iris.rows},
        "expected": [0, 1, 2],
    }
    server = start_server(onnx_model_dir, config, workers=1)
    bodies: list[dict[str, Any]] = [
        {"data": iris.rows},
        {"dataframe_split": {"columns": COLUMNS, "data": iris.rows}},
        {"inputs": iris.rows},
    ]
    for body in bodies:
        response = requests.post(f"{server.url}/score", json=body, timeout=5)
        assert response.status_code == 200, response.text
        assert response.json() == {"predictions": [0, 1, 2]}
    wrong = requests.post(f"{server.url}/score", json={"data": [[1, 2, 3]]}, timeout=5)
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_input"
    flat = requests.post(f"{server.url}/score", json={"data": [1, 2, 3, 4]}, timeout=5)
    assert flat.status_code == 400
    assert "2-D" in flat.json()["message"]
