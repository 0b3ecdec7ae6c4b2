"""The process target's build stage, with real virtualenvs (uv) and real installs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from modelcd.builders import bundle as bundle_mod
from modelcd.builders.bundle import env_key, install_error_excerpt, normalise_requirements, runtime_requirements
from modelcd.domain import Flavor
from modelcd.errors import BuildError, Cancelled

from .conftest import SAMPLE, SKLEARN_REQ, Built, Recorder, iris_version

# -- pure helpers ----------------------------------------------------------------------------


def test_normalise_requirements_sorts_dedupes_and_normalises_names() -> None:
    got = normalise_requirements(["Scikit_Learn==1.5", "  numpy >=2 ", "", "# comment", "numpy >=2", "A.B-c"])
    assert got == ["a-b-c", "numpy >=2", "scikit-learn==1.5"]


@pytest.mark.parametrize("bad", ["--index-url http://127.0.0.1:9/simple", "-r /etc/passwd",
                                 "-e .", "numpy\n--extra-index-url http://x", "numpy\r-c x", "==1.0"])
def test_normalise_requirements_refuses_installer_options_and_line_breaks(bad: str) -> None:
    with pytest.raises(BuildError) as err:
        normalise_requirements([bad])
    assert err.value.field == "requirements"


def test_env_key_depends_on_python_and_requirements_not_their_order() -> None:
    a = env_key("cpython 3.11.7 x86_64", ["numpy", "pandas"], ["gunicorn>=22"])
    assert a == env_key("cpython 3.11.7 x86_64", ["pandas", "numpy"], ["gunicorn>=22"])
    assert a != env_key("cpython 3.12.1 x86_64", ["numpy", "pandas"], ["gunicorn>=22"])
    assert a != env_key("cpython 3.11.7 x86_64", ["numpy"], ["gunicorn>=22"])
    assert a != env_key("cpython 3.11.7 x86_64", ["numpy", "pandas"], ["gunicorn>=23"])
    assert len(a) == 64


def test_install_error_excerpt_starts_at_the_error_line() -> None:
    out = ["Using Python 3.11", "Resolved 3 packages", "error: No solution found", "  cause: foo was not found", ""]
    assert install_error_excerpt(out) == "error: No solution found\n  cause: foo was not found"
    assert install_error_excerpt(["a", "", "b", "c"], limit=2) == "b\nc"


def test_runtime_requirements_come_from_the_scoring_runtime() -> None:
    reqs = runtime_requirements()
    assert reqs and all(isinstance(r, str) for r in reqs)


# -- real builds -----------------------------------------------------------------------------


def test_bundle_has_model_runtime_settings_and_a_working_env(built: Built, iris_files: Path,
                                                             shared_home: Path) -> None:
    b = built.bundle
    assert b.path == shared_home / "bundles" / "iris" / f"1-{iris_version(iris_files).digest12}"
    assert (b.path / "model" / "model.joblib").read_bytes() == (iris_files / "model.joblib").read_bytes()
    assert (b.path / "runtime" / "modelcd" / "__init__.py").is_file()
    assert (b.path / "runtime" / "modelcd" / "scoring").is_dir()
    assert not list((b.path / "runtime").rglob("__pycache__"))
    scoring = json.loads((b.path / "scoring.json").read_text())
    assert scoring == {"model": "iris", "version": 1, "flavor": "sklearn", "model_file": "model.joblib",
                       "entry_script": None, "sample": {"data": SAMPLE}, "expected": None}
    meta = json.loads((b.path / "bundle.json").read_text())
    assert meta["python"] == str(b.python) and meta["env_key"] == b.env_key and meta["created_at"]
    assert b.python == shared_home / "envs" / b.env_key / "bin" / "python"
    assert not [p for p in (shared_home / "envs").iterdir() if p.name.startswith(".tmp")]
    # The env runs the control plane's interpreter version and loads the pickle.
    code = ("import sys, joblib, gunicorn; m = joblib.load(sys.argv[1]); "
            "print(sys.version_info[:2], m.predict(eval(sys.argv[2])).tolist())")
    out = subprocess.run([str(b.python), "-c", code, str(b.path / "model" / "model.joblib"), repr(SAMPLE)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{tuple(sys.version_info[:2])} [0, 2]"


def test_second_version_with_same_requirements_reuses_the_env(built: Built, build: Callable[..., Built],
                                                              shared_home: Path, iris_files: Path) -> None:
    second = build(shared_home, iris_version(iris_files, 2))
    assert second.bundle.reused_env and second.bundle.env_key == built.bundle.env_key
    assert f"reusing environment {built.bundle.env_key[:12]}" in second.log.lines
    assert second.bundle.path != built.bundle.path and second.bundle.python == built.bundle.python
    assert second.seconds < 3, f"warm build took {second.seconds:.1f}s"


def test_rebuilding_the_same_version_is_idempotent(built: Built, build: Callable[..., Built],
                                                   shared_home: Path, iris_files: Path) -> None:
    before = (built.bundle.path / "bundle.json").read_text()
    again = build(shared_home, iris_version(iris_files))
    assert again.bundle.path == built.bundle.path and again.bundle.reused_env
    assert (built.bundle.path / "bundle.json").read_text() == before
    assert any(line.startswith("reusing bundle") for line in again.log.lines)


def test_a_new_env_is_ready_with_what_serving_imports_compiled_and_the_rest_compiles_after(
        built: Built, build: Callable[..., Built], tmp_path: Path, iris_files: Path) -> None:
    """A new env (its wheels in uv's cache from the shared env) is installed from the cache
    alone, without compiling it whole: what a scoring process imports has its bytecode when the
    build returns, and a detached idle-priority process compiles the rest afterwards."""
    fresh = build(tmp_path, iris_version(iris_files))
    assert not fresh.bundle.reused_env
    lines = fresh.log.lines
    assert any(line.startswith("compiling what serving imports") for line in lines), lines
    assert "compiling the rest of the environment in the background" in lines
    assert any(line.startswith("installed ") and line.endswith("requirements from uv's cache") for line in lines)
    assert not any(line.startswith("not imported:") for line in lines), lines
    site = next((tmp_path / "envs" / fresh.bundle.env_key).glob("lib/python*/site-packages"))
    tag = sys.implementation.cache_tag
    for module in ("sklearn/base", "sklearn/linear_model/_logistic", "numpy/__init__", "gunicorn/arbiter",
                   "uvicorn/main"):
        folder, name = (site / module).parent, (site / module).name
        assert (folder / "__pycache__" / f"{name}.{tag}.pyc").is_file(), module
    sources = [s for s in (site / "sklearn").rglob("*.py") if "tests" not in s.parts]

    def missing() -> list[Path]:
        return [s for s in sources if not (s.parent / "__pycache__" / f"{s.stem}.{tag}.pyc").is_file()]

    deadline = time.monotonic() + 180
    while missing() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing(), missing()[:5]


def test_what_a_build_runs_in_the_env_gets_no_secret_of_the_service(built: Built,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The imports a build runs with an env's interpreter (the import check, the compile of what
    serving imports: packages' and a loader module's code) see what a scoring process sees, and
    write bytecode even when the service itself does not."""
    for name, value in (("MODELCD_TOKEN", "service-secret-1"), ("AWS_SECRET_ACCESS_KEY", "service-secret-2"),
                        ("GITHUB_TOKEN", "service-secret-3"), ("PYTHONDONTWRITEBYTECODE", "1")):
        monkeypatch.setenv(name, value)
    log = Recorder()
    code = "import os, sys; print(sorted(os.environ.items())); print('dont_write', sys.dont_write_bytecode)"
    rc, _tail = bundle_mod._run_in_env(built.bundle.python.parent.parent, [code], log, threading.Event())
    assert rc == 0, log.text
    assert "service-secret" not in log.text and "MODELCD_TOKEN" not in log.text, log.text
    assert "('PATH'," in log.text and "dont_write False" in log.text, log.text


def test_requirement_that_cannot_install_names_it_and_leaves_no_env(build: Callable[..., Built],
                                                                   tmp_path: Path, iris_files: Path) -> None:
    version = iris_version(iris_files, requirements=("modelcd-no-such-package-xyz==1.0",))
    with pytest.raises(BuildError) as err:
        build(tmp_path, version)
    assert "modelcd-no-such-package-xyz" in err.value.message
    assert "error" in err.value.message.lower()
    assert list((tmp_path / "envs").iterdir()) == []
    assert not (tmp_path / "bundles").exists()


def test_syntax_error_in_entry_script_names_file_and_line(build: Callable[..., Built], tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "score.py").write_text("def init():\n    pass\ndef run(raw_data)\n    return raw_data\n")
    version = iris_version(files, flavor=Flavor.CUSTOM, model_file=None, entry_script="score.py")
    with pytest.raises(BuildError) as err:
        build(tmp_path / "home", version, files)
    assert "score.py:3" in err.value.message and err.value.field == "entry_script"
    assert not (tmp_path / "home" / "envs").exists()


@pytest.mark.parametrize(("changes", "needle"), [
    ({"model_file": "missing.joblib"}, "not found"),
    ({"model_file": "../../etc/passwd"}, "outside"),
    ({"model": "../evil"}, "safe folder name"),
    ({"model": "x$(touch pwned)"}, "safe folder name"),
])
def test_bad_paths_and_names_are_refused_before_building(build: Callable[..., Built], tmp_path: Path,
                                                         iris_files: Path, changes: dict[str, Any],
                                                         needle: str) -> None:
    with pytest.raises(BuildError, match=needle):
        build(tmp_path, iris_version(iris_files, **changes))
    assert not (tmp_path / "envs").exists() and not (tmp_path.parent / "evil").exists()


def test_cancel_during_install_kills_the_installer_and_leaves_nothing(build: Callable[..., Built],
                                                                     tmp_path: Path, iris_files: Path) -> None:
    """Stop is set as soon as an installer (``uv pip install``, from the cache or the index)
    runs: the build raises Cancelled, no installer is left running and nothing is left behind."""
    cancel = threading.Event()
    log = Recorder()
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not cancel.is_set():
            installers = [p for p in psutil.Process().children(recursive=True) if _is_installer(p)]
            if installers:
                seen.append(len(installers))
                cancel.set()
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(Cancelled):
            bundle_mod.build_bundle(tmp_path, iris_version(iris_files, requirements=(SKLEARN_REQ, "pandas")),
                                    iris_files, log, cancel)
    finally:
        done.set()
        watcher.join()
    assert seen, log.text
    assert _uv_children() == 0
    assert list((tmp_path / "envs").iterdir()) == []
    assert not list(tmp_path.rglob("*.requirements.txt"))


def _is_installer(proc: psutil.Process) -> bool:
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return False
    return "pip" in argv and "install" in argv


def test_cancel_before_start_does_nothing(build: Callable[..., Built], tmp_path: Path, iris_files: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        build(tmp_path, iris_version(iris_files), cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builds_of_one_env_build_it_once(build: Callable[..., Built], tmp_path: Path,
                                                    iris_files: Path) -> None:
    results: list[Built | BaseException] = []

    def one(n: int) -> None:
        try:
            results.append(build(tmp_path, iris_version(iris_files, n, requirements=())))
        except BaseException as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    built = [r for r in results if isinstance(r, Built)]
    assert len(built) == 2, results
    assert sorted(b.bundle.reused_env for b in built) == [False, True]
    assert [p.name for p in (tmp_path / "envs").iterdir()] == [built[0].bundle.env_key]


def _uv_children() -> int:
    """Installer processes (uv) started by this test process and still running."""
    return sum(1 for p in psutil.Process().children(recursive=True)
               if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "uv" in p.name())


def test_valid_custom_entry_script_builds_on_the_shared_env(built: Built, build: Callable[..., Built],
                                                            shared_home: Path, tmp_path: Path) -> None:
    (tmp_path / "score.py").write_text("def init():\n    pass\n\n\ndef run(raw_data):\n    return raw_data\n")
    version = iris_version(tmp_path, 3, flavor=Flavor.CUSTOM, model_file=None, entry_script="score.py")
    got = build(shared_home, version, tmp_path)
    assert got.bundle.reused_env and got.bundle.env_key == built.bundle.env_key
    scoring = json.loads((got.bundle.path / "scoring.json").read_text())
    assert scoring["flavor"] == "custom" and scoring["entry_script"] == "score.py"


@pytest.mark.slow  # python -m venv runs ensurepip: ~10 s of CPU
def test_without_uv_falls_back_to_venv_and_pip(build: Callable[..., Built], tmp_path: Path, iris_files: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_mod, "find_uv", lambda: None)
    monkeypatch.setattr(bundle_mod, "runtime_requirements", lambda: [])
    got = build(tmp_path, iris_version(iris_files, requirements=()))
    assert "uv not found; creating environment with" in got.log.text
    env = tmp_path / "envs" / got.bundle.env_key
    # Scripts written while the env sat in its temp folder now point at its final place.
    pip = subprocess.run([str(env / "bin" / "pip"), "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and str(env) in pip.stdout, pip.stderr


# -- MLflow pyfunc models --------------------------------------------------------------------


def pyfunc_files(folder: Path, python: str) -> Path:
    """The files of an MLflow pyfunc model saved with Python ``python`` (no model inside:
    the build never loads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n    python_model: python_model.pkl\n"
        f"    python_version: {python}\n    env: {{virtualenv: python_env.yaml}}\nmlflow_version: 3.17.2\n")
    (folder / "python_env.yaml").write_text(f"python: {python}\ndependencies:\n- -r requirements.txt\n")
    (folder / "requirements.txt").write_text("mlflow==3.17.2\n")
    (folder / "python_model.pkl").write_bytes(b"not loaded at build time")
    return folder


def pyfunc_version(files: Path, requirements: tuple[str, ...]) -> Any:
    return iris_version(files, flavor=Flavor.PYFUNC, model_file="MLmodel", requirements=requirements)


def test_a_python_version_this_host_lacks_fails_the_build_naming_it(build: Callable[..., Built],
                                                                   tmp_path: Path) -> None:
    files = pyfunc_files(tmp_path / "files", "3.5.10")
    with pytest.raises(BuildError) as err:
        build(tmp_path / "home", pyfunc_version(files, ("mlflow-skinny==3.17.2",)), files)
    message = err.value.message
    assert "was saved with Python 3.5.10" in message and "no Python 3.5" in message and err.value.field == "python"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in message  # what modelcd builds with
    assert not (tmp_path / "home" / "envs").exists() or list((tmp_path / "home" / "envs").iterdir()) == []


def test_check_model_python_compares_major_and_minor(tmp_path: Path) -> None:
    files = pyfunc_files(tmp_path / "files", "3.11.2")
    version = pyfunc_version(files, ())
    bundle_mod.check_model_python(files, version, "3.11.9", "the base image python:3.11-slim")  # patch: fine
    with pytest.raises(BuildError, match=r"saved with Python 3.11.2, but the base image python:3.12-slim has "
                                         r"Python 3.12.1: use a base image with Python 3.11"):
        bundle_mod.check_model_python(files, version, "3.12.1", "the base image python:3.12-slim")


def test_a_pyfunc_environment_is_checked_by_importing_what_serves_it(build: Callable[..., Built],
                                                                    tmp_path: Path) -> None:
    """Real builds: the model's requirements with mlflow-skinny, then the scoring server, MLflow's
    pyfunc and the model's loader module are imported in the new environment (compiling what
    they import); a loader that does not import fails the build and leaves no env."""
    import mlflow
    import numpy
    import pandas

    version_text = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    reqs = (f"mlflow-skinny=={mlflow.__version__}", f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}")
    broken = pyfunc_files(tmp_path / "broken", version_text)
    mlmodel = (broken / "MLmodel").read_text().replace("mlflow.pyfunc.model", "mlflow.no_such_flavor")
    (broken / "MLmodel").write_text(mlmodel)
    with pytest.raises(BuildError, match=r"(?s)fails in the environment.*No module named 'mlflow.no_such_flavor'"):
        build(tmp_path / "home", pyfunc_version(broken, reqs), broken)
    assert list((tmp_path / "home" / "envs").iterdir()) == []

    files = pyfunc_files(tmp_path / "files", version_text)
    result = build(tmp_path / "home", pyfunc_version(files, reqs), files)
    assert ("checking the environment: import modelcd.scoring.server, mlflow.pyfunc, mlflow.pyfunc.scoring_server, "
            "mlflow.utils.proto_json_utils, mlflow.pyfunc.model") in result.log.text
    assert f"the model was saved with Python {version_text}" in result.log.text
    config = json.loads((result.bundle.path / "scoring.json").read_text())
    assert (config["flavor"], config["model_file"]) == ("pyfunc", "MLmodel")
    site = next((result.bundle.python.parent.parent / "lib").glob("python*/site-packages"))
    assert list((site / "mlflow" / "pyfunc" / "scoring_server" / "__pycache__").glob("__init__.*.pyc"))  # by the probe
    out = subprocess.run([str(result.bundle.python), "-c", "import mlflow.pyfunc, pandas; print('ok')"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    print(f"\npyfunc environment built in {result.seconds:.1f} s")
