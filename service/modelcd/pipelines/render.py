"""Render release pipelines from ``pipeline_templates/``: a GitHub Actions workflow or an
Azure Pipelines file per model, whose stages are modelcd commands.

Rendering is strict (an undefined variable fails) and sandboxed (``modelcd.templating``).
Only validated values reach a template: the model name (registry rules: letters, digits,
``.``, ``_``, ``-``), the environment name, and settings checked here; every value is written
as a quoted YAML scalar. Values known only when a run starts (version, release id, token)
are inputs / parameters that the templates pass to scripts through environment variables,
never inside ``run:`` text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelcd.errors import InvalidInput
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.templating import render


class Provider(StrEnum):
    GITHUB = "github"
    AZURE = "azure"


TEMPLATES = {Provider.GITHUB: "github/release.yml.j2", Provider.AZURE: "azure/release.yml.j2"}
PATHS = {Provider.GITHUB: ".github/workflows/modelcd-release-{model}.yml",
         Provider.AZURE: "azure-pipelines/modelcd-release-{model}.yml"}
# build → deploy → smoke → promote, rollback when any of them failed; `environment` marks the
# approval gate (GitHub Environments' required reviewers / Azure environment approvals).
STAGES: tuple[dict[str, Any], ...] = (
    {"name": "build", "needs": [], "environment": False, "timeout_minutes": 60},
    {"name": "deploy", "needs": ["build"], "environment": False, "timeout_minutes": 30},
    {"name": "smoke", "needs": ["deploy"], "environment": False, "timeout_minutes": 15},
    {"name": "promote", "needs": ["smoke"], "environment": True, "timeout_minutes": 15},
    {"name": "rollback", "needs": ["build", "deploy", "smoke", "promote"], "environment": False,
     "timeout_minutes": 15},
)
_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/@+=<>!~,\[\]-]{0,199}$")  # runner labels, pools
# what the install step hands to pip: a requirement (modelcd==1.2), a wheel or a project path relative
# to the checkout (./dist/modelcd-1.2-py3-none-any.whl), a URL (git+https://github.com/acme/modelcd@v1.2);
# never an option (a leading -), never credentials in a URL (https://user:token@host)
_PACKAGE = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9 ._:/@+=<>!~,\[\]-]{0,199}$")
_URL_USERINFO = re.compile(r"([A-Za-z0-9+.-]+)://([^/@]*)@")  # scheme, user[:password]
_SECRET_NAME = re.compile(r"^(?!GITHUB_)[A-Za-z_][A-Za-z0-9_]{0,99}$")
_URL = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?$")


@dataclass(frozen=True)
class PipelineOptions:
    """What a rendered pipeline needs beyond the model's name."""

    environment: str = "production"  # default of the environment input
    runs_on: str = "ubuntu-latest"  # GitHub: runner label
    pool: dict[str, str] = field(default_factory=lambda: {"vmImage": "ubuntu-latest"})  # Azure: pool
    package: str = "modelcd"  # what the pipeline installs (pip requirement)
    callback_url: str = "http://127.0.0.1:8600"  # Azure: default of the callback_url parameter
    # the runner's secrets that build and deploy get as environment variables of the same
    # names (the policy's pipeline.registry_username_env / registry_password_env)
    registry_username_env: str = "MODELCD_REGISTRY_USERNAME"
    registry_password_env: str = "MODELCD_REGISTRY_PASSWORD"


@dataclass(frozen=True)
class RenderedPipeline:
    provider: Provider
    path: str  # relative to the repository root
    text: str


def pipeline_path(model: str, provider: Provider) -> str:
    return PATHS[provider].format(model=model)


def render_pipeline(model: str, provider: Provider | str, options: PipelineOptions | None = None) -> RenderedPipeline:
    """Render the release pipeline of ``model`` for ``provider``; InvalidInput names a bad value."""
    options = options or PipelineOptions()
    try:
        provider = Provider(provider)
    except ValueError:
        raise InvalidInput(f"unknown provider {provider!r}; use github or azure", field="provider") from None
    validate_model_name(model)
    validate_environment_name(options.environment)
    _check_text(options.runs_on, "runs_on")
    _check_package(options.package)
    for key, value in options.pool.items():
        if key not in ("vmImage", "name"):
            raise InvalidInput(f"pool key {key!r} is not vmImage or name", field="pool")
        _check_text(value, "pool")
    for name, value in (("registry_username_env", options.registry_username_env),
                        ("registry_password_env", options.registry_password_env)):
        if not _SECRET_NAME.match(value):
            raise InvalidInput(f"{name} {value!r} is not a secret name (letters, digits and _, not starting with a "
                               "digit or GITHUB_)", field=name)
    if not _URL.match(options.callback_url):
        raise InvalidInput(f"callback URL {options.callback_url!r} is not an http(s) URL", field="callback_url")
    values = {"model": model, "environment": options.environment, "runs_on": options.runs_on,
              "pool": options.pool, "package": options.package, "callback_url": options.callback_url,
              "stages": STAGES, "registry_username_env": options.registry_username_env,
              "registry_password_env": options.registry_password_env}
    text = render(TEMPLATES[provider], values)
    return RenderedPipeline(provider=provider, path=pipeline_path(model, provider), text=text)


def _check_text(value: str, field: str) -> None:
    if not isinstance(value, str) or not _TEXT.match(value):
        raise InvalidInput(f"{field} {value!r} has characters a pipeline file cannot take safely "
                           "(letters, digits, spaces and ._:/@+=<>!~,[]- only)", field=field)


def _check_package(value: str) -> None:
    if not isinstance(value, str):
        raise InvalidInput("package is not a string", field="package")
    # checked first, so that the message below never repeats a token; an SSH user name
    # (git+ssh://git@github.com/...) is no secret: the runner's SSH key authenticates
    if any(not (m[1].endswith("ssh") and ":" not in m[2]) for m in _URL_USERINFO.finditer(value)):
        raise InvalidInput("package: a URL with credentials would be written into the pipeline file; give the "
                           "URL without them and let the CI system authenticate (docs/pipelines.md)", field="package")
    if not _PACKAGE.match(value):
        raise InvalidInput(f"package {value!r} has characters a pipeline file cannot take safely (letters, digits, "
                           "spaces and ._:/@+=<>!~,[]- only, starting with a letter, digit or .)", field="package")
