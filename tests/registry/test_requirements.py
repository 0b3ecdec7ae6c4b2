"""Requirements: requirements.txt lines, conda YAML, and every refusal naming its line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from modelcd.errors import InvalidInput
from modelcd.registry.requirements import (
    conda_to_pip,
    load_pyfunc_environment,
    load_requirements,
    parse_conda_text,
    parse_requirements_text,
    pyfunc_requirements,
    python_minor,
    read_requirements,
)

# --------------------------------------------------------------------------- requirements.txt text


def test_plain_requirements_are_normalised_in_order() -> None:
    text = """
# the model's libraries
scikit-learn >= 1.3, <1.6   # inline comment
numpy==1.26.4
pandas[performance]~=2.2
onnxruntime ; python_version >= "3.9"
numpy==1.26.4
joblib \\
    >=1.3
tzdata @ https://files.example.org/tzdata-2024.1-py2.py3-none-any.whl
"""
    assert parse_requirements_text(text) == (
        "scikit-learn<1.6,>=1.3",
        "numpy==1.26.4",
        "pandas[performance]~=2.2",
        'onnxruntime; python_version >= "3.9"',
        "joblib>=1.3",
        "tzdata @ https://files.example.org/tzdata-2024.1-py2.py3-none-any.whl",
    )


def test_empty_text_gives_no_requirements() -> None:
    assert parse_requirements_text("") == ()
    assert parse_requirements_text("# nothing\n\n   \n") == ()


@pytest.mark.parametrize(("text", "line", "expected"), [
    ("numpy\n-e git+https://github.com/x/y.git#egg=y\n", 2, ["option '-e'", "editable installs are not supported"]),
    ("--editable ./pkg\n", 1, ["option '--editable'", "name==version"]),
    ("-r other.txt\n", 1, ["include files are not supported", "paste their lines"]),
    ("-rother.txt\n", 1, ["include files are not supported"]),
    ("-c constraints.txt\n", 1, ["include files are not supported"]),
    ("numpy\n\n--index-url https://pypi.example.org/simple\n", 3,
     ["option '--index-url'", "wheelhouse", "pip.conf"]),
    ("--extra-index-url=https://x.org/simple\n", 1, ["option '--extra-index-url=https://x.org/simple'", "wheelhouse"]),
    ("-i https://x.org/simple\n", 1, ["wheelhouse"]),
    ("--find-links /wheels\n", 1, ["wheelhouse"]),
    ("--trusted-host example.org\n", 1, ["wheelhouse"]),
    ("--no-deps\n", 1, ["pip options are not supported", "scikit-learn==1.5.2"]),
    ("numpy==1.0 --hash=sha256:abcd\n", 1, ["carries pip options (e.g. --hash)", "remove them"]),
    ("numpy\nscikit learn\n", 2, ["'scikit learn' is not a valid requirement", "e.g. 'scikit-learn==1.5.2'"]),
    ("./local/pkg\n", 1, ["is not a valid requirement"]),
    ("https://example.org/pkg.whl\n", 1, ["is not a valid requirement"]),
    ("numpy>=>1\n", 1, ["is not a valid requirement"]),
    ("pkg @ file:///home/me/pkg.whl\n", 1, ["'pkg' comes from a file URL", "only http(s) URLs"]),
    ("pkg @ git+https://github.com/x/pkg\n", 1, ["'pkg' comes from a git+https URL"]),
])
def test_bad_requirement_lines(text: str, line: int, expected: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_requirements_text(text)
    assert e.value.field == "requirements"
    assert f"requirements.txt line {line}:" in e.value.message
    for item in expected:
        assert item in e.value.message


@pytest.mark.parametrize("text", [
    "numpy\npkg @ https://deploy:hunter2@pypi.internal.example/pkg-1.0.whl\n",
    "pkg @ https://token-hunter2@pypi.internal.example/pkg-1.0.whl\n",
    "pkg @@ https://deploy:hunter2@pypi.internal.example/pkg.whl\n",
    "--index-url https://deploy:hunter2@pypi.internal.example/simple\n",
    "pkg==1 --extra-index-url https://u:hunter2@x.example/simple\n",
])
def test_credentials_in_urls_are_refused_and_never_echoed(text: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_requirements_text(text)
    assert "hunter2" not in e.value.message
    assert e.value.field == "requirements"


def test_credentials_message_says_what_to_do() -> None:
    with pytest.raises(InvalidInput) as e:
        parse_requirements_text("pkg @ https://deploy:hunter2@pypi.internal.example/pkg-1.0.whl\n")
    assert "line 1: the URL of 'pkg' contains credentials; remove them" in e.value.message


def test_continuation_lines_report_their_first_line() -> None:
    with pytest.raises(InvalidInput, match="line 2:"):
        parse_requirements_text("numpy\nnot \\\n valid req\n")


# --------------------------------------------------------------------------- conda YAML

MLFLOW_CONDA = """channels:
- conda-forge
dependencies:
- python=3.11.7
- pip<=24.0
- scikit-learn=1.5.2
- conda-forge::numpy=1.26=py311h64a7726_0
- cudatoolkit=11.8
- pip:
  - mlflow==2.16.2
  - cloudpickle==3.0.0
  - scikit-learn==1.5.2
name: mlflow-env
"""


def test_conda_yaml_pip_part_and_obvious_conda_packages() -> None:
    result = parse_conda_text(MLFLOW_CONDA)
    assert result.requirements == ("scikit-learn==1.5.2.*", "numpy==1.26.*", "mlflow==2.16.2",
                                   "cloudpickle==3.0.0", "scikit-learn==1.5.2")
    assert result.source == "conda.yaml"
    assert len(result.notes) == 1
    assert "conda.yaml line 8: conda package 'cudatoolkit=11.8' ignored" in result.notes[0]
    assert "add it under `- pip:`" in result.notes[0]


@pytest.mark.parametrize(("spec", "expected"), [
    ("scikit-learn", "scikit-learn"),
    ("scikit-learn=1.5", "scikit-learn==1.5.*"),
    ("scikit-learn=1.5.*", "scikit-learn==1.5.*"),
    ("scikit-learn==1.5.2", "scikit-learn==1.5.2"),
    ("scikit-learn==1.5.2=py311_0", "scikit-learn==1.5.2"),
    ("scikit-learn >=1.3,<1.6", "scikit-learn<1.6,>=1.3"),
    ("numpy 1.26.*", "numpy==1.26.*"),
    ("conda-forge::pandas=2.2", "pandas==2.2.*"),
    ("NumPy", "numpy"),
    ("cudatoolkit=11.8", None),
    ("libgcc-ng", None),
    ("python=3.11", None),
    ("scikit-learn=not a version!", None),
])
def test_conda_to_pip(spec: str, expected: str | None) -> None:
    assert conda_to_pip(spec) == expected


def test_conda_without_dependencies() -> None:
    assert parse_conda_text("name: empty\n").requirements == ()


@pytest.mark.parametrize(("text", "expected"), [
    ("dependencies: [\n", ["conda.yaml is not valid YAML", "line 2", "or use a requirements.txt"]),
    ("- just\n- a list\n", ["must be a mapping with a `dependencies:` list"]),
    ("dependencies: numpy\n", ["conda.yaml line 1: `dependencies` must be a list"]),
    ("dependencies:\n- numpy\n- pip:\n  - good==1\n  - -e ./local\n", ["conda.yaml line 5:", "editable"]),
    ("dependencies:\n- pip:\n  - not valid req\n", ["conda.yaml line 3:", "not a valid requirement"]),
    ("dependencies:\n- conda: [x]\n", ["conda.yaml line 2: unexpected 'conda' entry", "`- pip: [...]`"]),
])
def test_bad_conda_yaml(text: str, expected: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_conda_text(text)
    assert e.value.field == "requirements"
    for item in expected:
        assert item in e.value.message


# --------------------------------------------------------------------------- which file


def test_requirements_txt_wins_over_conda(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("numpy==1.26.4\n")
    (tmp_path / "conda.yaml").write_text(MLFLOW_CONDA)
    assert load_requirements(tmp_path) == (("numpy==1.26.4",), "requirements.txt", ())


@pytest.mark.parametrize("name", ["conda.yaml", "conda.yml", "environment.yml", "environment.yaml"])
def test_conda_files_are_found(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("dependencies:\n- pip:\n  - joblib==1.4.2\n")
    result = load_requirements(tmp_path)
    assert result.requirements == ("joblib==1.4.2",) and result.source == name


def test_given_text_wins_and_may_be_conda(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("numpy\n")
    assert load_requirements(tmp_path, "pandas==2.2.2\n") == (("pandas==2.2.2",), "given", ())
    conda = load_requirements(tmp_path, "dependencies:\n- python=3.11\n- pip:\n  - scipy\n")
    assert conda.requirements == ("scipy",) and conda.source == "given"
    assert load_requirements(tmp_path, "").requirements == ()


def test_given_text_errors_name_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="given requirements line 2: option '-e'"):
        load_requirements(tmp_path, "numpy\n-e .\n")


def test_no_requirements_at_all(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    result = load_requirements(tmp_path)
    assert result.requirements == () and result.source == "none"
    assert "scoring image's packages" in result.notes[0]
    with caplog.at_level(logging.INFO, logger="modelcd.registry.requirements"):
        assert read_requirements(tmp_path, None) == ()
    assert "no requirements.txt" in caplog.text


def test_read_requirements_returns_the_tuple(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("scikit-learn==1.5.2\n")
    assert read_requirements(tmp_path, None) == ("scikit-learn==1.5.2",)


def test_requirements_file_must_be_utf8(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_bytes(b"numpy\xff\n")
    with pytest.raises(InvalidInput, match="requirements.txt is not UTF-8 text; save it as UTF-8"):
        load_requirements(tmp_path)


# --------------------------------------------------------------------------- MLflow pyfunc models


def test_pyfunc_requirements_serve_mlflow_as_skinny_and_add_what_pyfunc_imports() -> None:
    reqs, notes = pyfunc_requirements(("mlflow[genai]==3.17.2", "cloudpickle==3.1.3", "pandas==2.2.3"), "3.17.2")
    assert reqs == ("mlflow-skinny==3.17.2", "cloudpickle==3.1.3", "pandas==2.2.3", "numpy")
    assert "served as 'mlflow-skinny==3.17.2'" in notes[0]
    reqs, notes = pyfunc_requirements(("lightgbm==4.7.0",), "3.17.2")
    assert reqs == ("lightgbm==4.7.0", "mlflow-skinny==3.17.2", "numpy", "pandas")
    assert "added 'mlflow-skinny==3.17.2'" in notes[0]
    assert pyfunc_requirements(("mlflow-skinny>=3", "numpy", "pandas"), None) == (
        ("mlflow-skinny>=3", "numpy", "pandas"), ())
    assert pyfunc_requirements((), "3.1; rm -rf /")[0][0] == "mlflow-skinny"  # never a pin from an odd string


def test_pyfunc_environment_from_python_env_yaml(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n"
                                      "    python_version: 3.11.7\n    env: {conda: conda.yaml, virtualenv: "
                                      "python_env.yaml}\nmlflow_version: 3.17.2\n")
    (tmp_path / "python_env.yaml").write_text("python: 3.12.1\nbuild_dependencies:\n- pip==23.2.1\n"
                                              "dependencies:\n- -r requirements.txt\n- scipy\n")
    (tmp_path / "requirements.txt").write_text("mlflow==3.17.2\ncloudpickle==3.1.3\n")
    import yaml

    env = load_pyfunc_environment(tmp_path, "MLmodel", yaml.safe_load((tmp_path / "MLmodel").read_text()))
    assert env.python == "3.12.1" and env.source == "python_env.yaml"
    assert env.requirements == ("mlflow-skinny==3.17.2", "cloudpickle==3.1.3", "scipy", "numpy", "pandas")
    given = load_pyfunc_environment(tmp_path, "MLmodel", {"flavors": {}}, "lightgbm==4.7.0\n")
    assert given.source == "given" and given.requirements[0] == "lightgbm==4.7.0"
    assert given.python == "3.12.1"  # python_env.yaml beside the MLmodel still tells the version


def test_pyfunc_environment_refuses_includes_outside_the_model(tmp_path: Path) -> None:
    (tmp_path / "python_env.yaml").write_text("python: 3.11.7\ndependencies:\n- -r ../../etc/passwd\n")
    with pytest.raises(InvalidInput, match="names '../../etc/passwd', which") as e:
        load_pyfunc_environment(tmp_path, "MLmodel", {})
    assert e.value.field == "requirements"
    (tmp_path / "python_env.yaml").write_text("python: 3.11.7\ndependencies:\n- --index-url http://x/simple\n")
    with pytest.raises(InvalidInput, match="python_env.yaml dependencies line 1: option"):
        load_pyfunc_environment(tmp_path, "MLmodel", {})


def test_python_version_falls_back_to_mlmodel_then_conda(tmp_path: Path) -> None:
    conf = {"flavors": {"python_function": {"loader_module": "x", "python_version": "3.10.4"}}}
    assert load_pyfunc_environment(tmp_path, "MLmodel", conf).python == "3.10.4"
    (tmp_path / "conda.yaml").write_text("dependencies:\n- python=3.9.18\n- pip:\n  - mlflow==2.9.0\n")
    env = load_pyfunc_environment(tmp_path, "MLmodel", {"mlflow_version": "2.9.0"})
    assert env.python == "3.9.18" and env.requirements[0] == "mlflow-skinny==2.9.0"
    assert python_minor("3.11.7") == (3, 11) and python_minor("3.12") == (3, 12) and python_minor("x") is None
