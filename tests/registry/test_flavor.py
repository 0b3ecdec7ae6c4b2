"""Flavor detection from literal file trees: score.py checked by parsing, one model file,
MLflow's MLmodel, and every refusal with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcd.domain import Flavor
from modelcd.errors import InvalidInput
from modelcd.registry.flavors import DetectedFlavor, defined_names, detect_flavor, parse_flavor

SCORE = "import json\n\nmodel = None\n\ndef init():\n    global model\n\ndef run(raw_data):\n    return []\n"


def tree(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    return root


@pytest.mark.parametrize(("files", "expected"), [
    ({"score.py": SCORE, "model.pkl": b"p"}, (Flavor.CUSTOM, None, "score.py")),
    ({"model.onnx": b"o", "README.md": "x"}, (Flavor.ONNX, "model.onnx", None)),
    ({"nested/dir/clf.joblib": b"j"}, (Flavor.SKLEARN, "nested/dir/clf.joblib", None)),
    ({"model.PKL": b"p"}, (Flavor.SKLEARN, "model.PKL", None)),
    ({"model.skops": b"s", "MLmodel": "flavors:\n  sklearn:\n    pickled_model: model.skops\n"},
     (Flavor.SKLEARN, "model.skops", None)),
    ({"m.pickle": b"p", ".ipynb_checkpoints/m-checkpoint.pickle": b"p"}, (Flavor.SKLEARN, "m.pickle", None)),
    ({"score.py": "def init(): pass\n", "model.onnx": b"o"}, (Flavor.ONNX, "model.onnx", None)),
])
def test_detects_flavor_from_files(tmp_path: Path, files: dict[str, str | bytes],
                                   expected: tuple[Flavor, str | None, str | None]) -> None:
    result = detect_flavor(tree(tmp_path / "m", files), None)
    assert result == DetectedFlavor(*expected)
    flavor, model_file, entry_script = result  # a plain tuple too
    assert (flavor, model_file, entry_script) == expected


def test_entry_functions_may_be_async_imported_or_assigned(tmp_path: Path) -> None:
    script = "from mylib import init\nasync def run(raw):\n    return raw\n"
    root = tree(tmp_path / "m", {"score.py": script, "mylib.py": "def init(): pass\n"})
    assert detect_flavor(root, None).flavor is Flavor.CUSTOM
    assert {"init", "run", "x"} <= defined_names("init = lambda: None\nrun = print\nx: int = 1\n", "s.py")


def test_entry_script_is_parsed_never_imported(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    script = f"open({str(marker)!r}, 'w').write('x')\ndef init(): pass\ndef run(d): pass\n"
    assert detect_flavor(tree(tmp_path / "m", {"score.py": script}), None).flavor is Flavor.CUSTOM
    assert not marker.exists()


def test_given_entry_script(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"src/serve.py": SCORE, "model.pkl": b"p", "model.onnx": b"o"})
    assert detect_flavor(root, None, "src/serve.py") == (Flavor.CUSTOM, None, "src/serve.py")
    assert detect_flavor(root, "custom", "./src/serve.py") == (Flavor.CUSTOM, None, "src/serve.py")


def test_given_flavor_picks_among_several_kinds(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"model.pkl": b"p", "model.onnx": b"o", "score.py": SCORE})
    assert detect_flavor(root, "onnx") == (Flavor.ONNX, "model.onnx", None)
    assert detect_flavor(root, "SKLEARN") == (Flavor.SKLEARN, "model.pkl", None)
    assert detect_flavor(root, "custom") == (Flavor.CUSTOM, None, "score.py")


def test_mlmodel_names_the_sklearn_pickle(tmp_path: Path) -> None:
    mlmodel = ("artifact_path: model\nflavors:\n  python_function:\n    loader_module: mlflow.sklearn\n"
               "    model_path: model.pkl\n  sklearn:\n    pickled_model: model.pkl\n"
               "    serialization_format: cloudpickle\n    sklearn_version: 1.5.2\n")
    root = tree(tmp_path / "m", {"model/MLmodel": mlmodel, "model/model.pkl": b"p",
                                 "model/extra/encoder.pkl": b"e", "model/conda.yaml": "x"})
    assert detect_flavor(root, None) == (Flavor.SKLEARN, "model/model.pkl", None)
    assert detect_flavor(root, "sklearn") == (Flavor.SKLEARN, "model/model.pkl", None)


def test_mlmodel_names_the_onnx_graph(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"MLmodel": "flavors:\n  onnx:\n    data: model.onnx\n", "model.onnx": b"o",
                                 "other.onnx": b"o"})
    assert detect_flavor(root, None) == (Flavor.ONNX, "model.onnx", None)


def test_mlmodel_naming_a_missing_file(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"MLmodel": "flavors:\n  sklearn:\n    pickled_model: gone.pkl\n"})
    with pytest.raises(InvalidInput, match="names model file 'gone.pkl', which is missing; include it") as e:
        detect_flavor(root, None)
    assert e.value.field == "flavor"


def test_mlmodel_escaping_the_tree(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"MLmodel": "flavors:\n  sklearn:\n    pickled_model: ../../etc/x.pkl\n"})
    with pytest.raises(InvalidInput, match=r"contains a '\.\.' segment; re-save the model with mlflow"):
        detect_flavor(root, None)


def test_broken_mlmodel_yaml(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"MLmodel": "flavors: [unclosed\n", "model.pkl": b"p"})
    with pytest.raises(InvalidInput, match="is not valid MLflow YAML.*set `flavor`"):
        detect_flavor(root, None)


def test_mlmodel_without_a_known_flavor_falls_back_to_the_files(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"MLmodel": "flavors:\n  pytorch:\n    model_data: data\n", "m.joblib": b"j"})
    assert detect_flavor(root, None) == (Flavor.SKLEARN, "m.joblib", None)


@pytest.mark.parametrize(("files", "given", "expected"), [
    ({"a.onnx": b"o", "b.pkl": b"p"}, None,
     ["found ONNX files (a.onnx) and pickles (b.pkl)", "--flavor onnx or --flavor sklearn", "keep only"]),
    ({"a.onnx": b"o", "b.onnx": b"o"}, None,
     ["exactly one *.onnx file, found 2: a.onnx, b.onnx", "keep only the model's file", "flavor 'custom'"]),
    ({"a.pkl": b"p", "b.joblib": b"j"}, "sklearn", ["found 2: a.pkl, b.joblib"]),
    ({"README.md": "x", "data.csv": "1"}, None,
     ["no model found", "score.py defining init() and run()", "one *.onnx file", "*.joblib",
      "files: README.md, data.csv", "set `flavor`"]),
    ({"score.py": "def run(x): pass\n", "data.csv": "1"}, None,
     ["no model found", "score.py is there but defines no init()"]),
    ({"model.pkl": b"p"}, "onnx", ["onnx needs one *.onnx file, found none among: model.pkl", "set another"]),
])
def test_ambiguous_or_missing_model_files(tmp_path: Path, files: dict[str, str | bytes], given: str | None,
                                          expected: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        detect_flavor(tree(tmp_path / "m", files), given)
    assert e.value.field == "flavor"
    for text in expected:
        assert text in e.value.message


def test_long_file_lists_are_shortened(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {f"f{i:02}.txt": "x" for i in range(25)})
    with pytest.raises(InvalidInput, match="f09.txt and 15 more"):
        detect_flavor(root, None)


def test_unknown_flavor_lists_known_ones() -> None:
    with pytest.raises(InvalidInput) as e:
        parse_flavor("tensorflow")
    assert e.value.field == "flavor"
    assert "unknown flavor 'tensorflow'; known flavors: sklearn, onnx, custom" in e.value.message
    assert parse_flavor(None) is None and parse_flavor(" ") is None and parse_flavor("ONNX") is Flavor.ONNX


def test_unknown_given_flavor_fails_before_looking_at_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="known flavors"):
        detect_flavor(tree(tmp_path / "m", {"model.pkl": b"p"}), "pytorch")


def test_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"score.py": "def init():\n    pass\n\ndef run(raw_data)\n    return 1\n",
                                 "model.pkl": b"p"})
    with pytest.raises(InvalidInput) as e:
        detect_flavor(root, None)
    assert e.value.field == "entry_script"
    assert "score.py, line 4:" in e.value.message and "fix the syntax error" in e.value.message


@pytest.mark.parametrize(("files", "given", "script", "expected"), [
    ({"score.py": "def init(): pass\n"}, "custom", None, ["score.py does not define run()", "def run(raw_data):"]),
    ({"s.py": "x = 1\n"}, None, "s.py", ["s.py does not define init() and run()", "def init():"]),
    ({"model.pkl": b"p"}, "custom", None, ["'score.py' is not a file in the model files", "add it"]),
    ({"model.pkl": b"p"}, None, "../score.py", ["contains a '..' segment", "relative to the model files"]),
    ({"model.pkl": b"p"}, None, "/etc/score.py", ["is an absolute path"]),
    ({"score.py": SCORE}, "sklearn", "score.py", ["only used with flavor 'custom', not 'sklearn'"]),
    ({"score.py": b"\xff\xfe def init"}, "custom", None, ["not UTF-8 text", "save it as UTF-8"]),
])
def test_bad_entry_scripts(tmp_path: Path, files: dict[str, str | bytes], given: str | None, script: str | None,
                           expected: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        detect_flavor(tree(tmp_path / "m", files), given, script)
    assert e.value.field == "entry_script"
    for text in expected:
        assert text in e.value.message


PYFUNC_MLMODEL = """flavors:
  python_function:
    loader_module: mlflow.pyfunc.model
    python_model: python_model.pkl
    python_version: 3.11.7
mlflow_version: 3.17.2
"""


def test_an_mlflow_model_without_sklearn_or_onnx_is_pyfunc(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"MLmodel": PYFUNC_MLMODEL, "python_model.pkl": b"p"})
    assert detect_flavor(root, None) == (Flavor.PYFUNC, "MLmodel", None)
    nested = tree(tmp_path / "n", {"model/MLmodel": PYFUNC_MLMODEL, "model/python_model.pkl": b"p"})
    assert detect_flavor(nested, None) == (Flavor.PYFUNC, "model/MLmodel", None)


def test_an_sklearn_mlmodel_keeps_the_fast_path_unless_pyfunc_is_asked_for(tmp_path: Path) -> None:
    both = PYFUNC_MLMODEL + "  sklearn:\n    pickled_model: model.pkl\n"
    root = tree(tmp_path / "m", {"MLmodel": both.replace("mlflow_version: 3.17.2\n", "") + "mlflow_version: 3\n",
                                 "model.pkl": b"p"})
    assert detect_flavor(root, None) == (Flavor.SKLEARN, "model.pkl", None)
    assert detect_flavor(root, "pyfunc") == (Flavor.PYFUNC, "MLmodel", None)


def test_pyfunc_needs_an_mlmodel_with_python_function(tmp_path: Path) -> None:
    root = tree(tmp_path / "m", {"model.pkl": b"p"})
    with pytest.raises(InvalidInput, match="pyfunc needs one MLflow MLmodel file with a python_function flavor") as e:
        detect_flavor(root, "pyfunc")
    assert e.value.field == "flavor"
    no_loader = tree(tmp_path / "n", {"MLmodel": "flavors:\n  python_function: {}\n", "model.pkl": b"p"})
    assert detect_flavor(no_loader, None) == (Flavor.SKLEARN, "model.pkl", None)  # not servable by pyfunc
