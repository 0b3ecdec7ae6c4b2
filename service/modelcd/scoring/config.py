"""The scoring configuration file: which model, which flavor, which files, which sample."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FLAVORS = ("sklearn", "onnx", "custom", "pyfunc")


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message lists every problem."""


@dataclass(frozen=True)
class ScoringConfig:
    """What one scoring process serves.

    ``model_file`` (sklearn, onnx: the model; pyfunc: the MLflow ``MLmodel`` file) and
    ``entry_script`` (custom) are relative to the model directory. ``sample`` is a request
    body and ``expected`` the predictions it should give; both only feed the OpenAPI document
    and the warm-up call, never a check at start-up.
    """

    model: str
    version: int | str
    flavor: str
    model_file: str | None = None
    entry_script: str | None = None
    sample: Any = None
    expected: Any = None
    skops_trusted_types: tuple[str, ...] = ()  # a .skops model_file: types trusted beyond skops' defaults


def parse_config(raw: Any) -> ScoringConfig:
    """Validate a decoded configuration document; raise ``ConfigError`` listing all problems."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config must be a JSON object")
    problems: list[str] = []
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        problems.append("'model' must be a non-empty string")
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int | str) or version == "":
        problems.append("'version' must be an integer or a non-empty string")
    flavor = raw.get("flavor")
    if flavor not in FLAVORS:
        problems.append(f"'flavor' must be one of {', '.join(FLAVORS)} (got {flavor!r})")
    model_file = raw.get("model_file")
    entry_script = raw.get("entry_script")
    if flavor in ("sklearn", "onnx", "pyfunc") and (not isinstance(model_file, str) or not model_file):
        problems.append(f"flavor {flavor!r} needs 'model_file' (a path relative to the model dir)")
    if flavor == "custom" and (not isinstance(entry_script, str) or not entry_script):
        problems.append("flavor 'custom' needs 'entry_script' (a path relative to the model dir)")
    expected = raw.get("expected")
    if expected is not None and flavor != "custom" and not isinstance(expected, list):
        problems.append("'expected' must be a list of predictions or null")
    trusted = raw.get("skops_trusted_types") or []
    if not isinstance(trusted, list) or not all(isinstance(t, str) and t for t in trusted):
        problems.append("'skops_trusted_types' must be a list of type names")
    if problems:
        raise ConfigError("invalid scoring config: " + "; ".join(problems))
    return ScoringConfig(
        model=str(model),
        version=version,  # type: ignore[arg-type]
        flavor=str(flavor),
        model_file=model_file if isinstance(model_file, str) else None,
        entry_script=entry_script if isinstance(entry_script, str) else None,
        sample=raw.get("sample"),
        expected=expected,
        skops_trusted_types=tuple(trusted),
    )


def load_config(path: str | os.PathLike[str]) -> ScoringConfig:
    """Read and validate the JSON configuration file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read scoring config {os.fspath(path)!r}: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError(f"scoring config {os.fspath(path)!r} is not valid JSON: {e}") from e
    return parse_config(raw)
