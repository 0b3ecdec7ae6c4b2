"""Jinja2 rendering of the files modelcd writes for other tools (Dockerfiles, pipelines).

One environment for all of them: sandboxed (a template cannot reach Python internals),
strict (an undefined variable is an error, not an empty string) and without autoescape
(the outputs are not HTML; each caller validates or quotes what it passes in). Templates
live in ``pipeline_templates/`` at the top of the repository, reachable from the package
as ``modelcd/pipeline_templates``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

import modelcd
from modelcd.errors import ConfigError

TEMPLATES_DIR = Path(modelcd.__file__).parent / "pipeline_templates"


@functools.cache
def environment(root: Path = TEMPLATES_DIR) -> ImmutableSandboxedEnvironment:
    """The shared rendering environment for templates under ``root``."""
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["yaml_str"] = yaml_str
    env.filters["yaml_flow"] = yaml_flow
    return env


def yaml_str(value: Any) -> str:
    """``value`` as a YAML double-quoted scalar (JSON string syntax, ASCII only): quotes,
    backslashes, newlines and ``#``/``:`` stay data, never YAML structure."""
    return json.dumps(str(value), ensure_ascii=True)


def render(name: str, values: Mapping[str, Any], root: Path = TEMPLATES_DIR) -> str:
    """Render template ``name`` (e.g. ``docker/Dockerfile.j2``) under ``root`` with ``values``.

    Raises ConfigError naming the template and the missing variable or syntax error.
    """
    try:
        return environment(root).get_template(name).render(**values)
    except jinja2.TemplateNotFound as e:
        raise ConfigError(f"template {name} not found under {root}", field="template") from e
    except jinja2.UndefinedError as e:
        raise ConfigError(f"template {name}: {e.message}", field="template") from e
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"template {e.filename or name}:{e.lineno}: {e.message}", field="template") from e


def yaml_flow(value: Any) -> str:
    """A mapping or list as a YAML flow collection (JSON syntax, ASCII only)."""
    return json.dumps(value, ensure_ascii=True)
