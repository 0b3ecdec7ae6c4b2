"""A version's Python requirements, read from its requirements.txt or conda YAML (or given
as text), each line checked and normalised to PEP 508."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import yaml
from packaging.requirements import InvalidRequirement, Requirement

from modelcd.errors import InvalidInput
from modelcd.registry.yaml_errors import yaml_problem

log = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements.txt"
CONDA_FILES = ("conda.yaml", "conda.yml", "environment.yml", "environment.yaml")
# conda package names whose pip name is obviously the same package
CONDA_TO_PIP = {name: name for name in (
    "scikit-learn", "numpy", "pandas", "scipy", "joblib", "onnx", "onnxruntime", "xgboost", "lightgbm",
    "cloudpickle", "pyyaml", "threadpoolctl", "pyarrow", "mlflow", "mlflow-skinny")}
CONDA_IGNORED = ("python", "pip", "setuptools", "wheel")  # provided by the scoring image itself
_CREDENTIALS_RE = re.compile(r"(://)[^/\s@]+@")
_CONDA_SPEC_RE = re.compile(r"^(?:[\w.-]+::)?(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)\s*(?P<spec>.*)$")
_FIX_INDEX = ("modelcd installs from the wheelhouse its builder prepares; configure package indexes on the "
              "build host (pip.conf / PIP_INDEX_URL), not in the model's requirements")
_OPTION_FIXES = {
    ("-e", "--editable"): "editable installs are not supported; list the package as name==version",
    ("-r", "--requirement", "-c", "--constraint"): "include files are not supported; paste their lines here",
    ("-i", "--index-url", "--extra-index-url", "--no-index", "-f", "--find-links", "--trusted-host",
     "--pre", "--prefer-binary", "--only-binary", "--no-binary"): _FIX_INDEX,
}


class Requirements(NamedTuple):
    """Requirements read from a version's files: ``source`` says which file (or "given", or
    "none"); ``notes`` say what was ignored and why."""

    requirements: tuple[str, ...]
    source: str
    notes: tuple[str, ...] = ()


def _redact(text: str) -> str:
    return _CREDENTIALS_RE.sub(r"\1***@", text)


def _bad_line(where: str, line: int, problem: str) -> InvalidInput:
    return InvalidInput(f"requirements: {where} line {line}: {problem}", field="requirements")


def _option_fix(option: str) -> str:
    name = option.split("=", 1)[0].split(" ", 1)[0]
    for names, fix in _OPTION_FIXES.items():
        if name in names or any(name.startswith(n) and len(n) == 2 for n in names):
            return fix
    return "pip options are not supported; list only package requirements such as 'scikit-learn==1.5.2'"


def parse_requirement_line(text: str, where: str, line: int) -> str | None:
    """One requirements line as a normalised PEP 508 string (None for blank/comment lines);
    InvalidInput naming ``where`` and ``line`` for options, bad syntax, credentials in URLs
    or URLs that are not http(s). The line is never echoed with credentials in it."""
    text = re.sub(r"(^|\s)#.*$", "", text).strip()
    if not text:
        return None
    if text.startswith("-"):
        raise _bad_line(where, line, f"option {_redact(text.split()[0])!r}: {_option_fix(text)}")
    if re.search(r"\s--?[A-Za-z]", text):
        raise _bad_line(where, line, f"{_redact(text)!r} carries pip options (e.g. --hash); remove them "
                        "and keep only the requirement")
    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        raise _bad_line(where, line, f"{_redact(text)!r} is not a valid requirement ({_redact(str(e))}); "
                        "write it as name[extras] specifier, e.g. 'scikit-learn==1.5.2'") from None
    if req.url:
        url = urlsplit(req.url)
        if url.username is not None or url.password is not None:
            raise _bad_line(where, line, f"the URL of {req.name!r} contains credentials; remove them "
                            "(never put secrets in model files) and publish the package to an index "
                            "the build host is configured for")
        if url.scheme not in ("http", "https"):
            raise _bad_line(where, line, f"{req.name!r} comes from a {url.scheme or 'local'} URL; only "
                            "http(s) URLs are supported: publish the package or pin it by version")
    return str(req)


def parse_requirements_text(text: str, where: str = REQUIREMENTS_FILE) -> tuple[str, ...]:
    """Parse requirements.txt text (comments, blank lines and ``\\`` continuations allowed)
    into normalised, de-duplicated PEP 508 strings in their order."""
    out: list[str] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        req = parse_requirement_line(pending + raw, where, start)
        pending = ""
        if req is not None and req not in out:
            out.append(req)
    if pending:
        req = parse_requirement_line(pending, where, start)
        if req is not None and req not in out:
            out.append(req)
    return tuple(out)


def conda_to_pip(spec: str) -> str | None:
    """The pip requirement for a conda dependency when the mapping is obvious (a package in
    CONDA_TO_PIP), else None. ``=1.3`` (conda's fuzzy match) becomes ``==1.3.*``."""
    m = _CONDA_SPEC_RE.match(spec.strip())
    if not m or m["name"].lower() not in CONDA_TO_PIP:
        return None
    name, version = CONDA_TO_PIP[m["name"].lower()], m["spec"].replace(" ", "")
    if version.startswith("=="):
        version = "==" + version[2:].split("=")[0]
    elif version.startswith("="):
        v = version[1:].split("=")[0]
        version = f"=={v}" if v.endswith("*") else f"=={v}.*"
    elif version and version[0].isdigit():
        version = "==" + version.split("=")[0]
    try:
        return str(Requirement(name + version))
    except InvalidRequirement:
        return None


def _conda_node(text: str, where: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise InvalidInput(f"requirements: {where} is not valid YAML ({yaml_problem(e)}); fix it, or use a "
                           "requirements.txt", field="requirements") from None


def _conda_dependencies(root_node: yaml.Node | None, where: str) -> list[yaml.Node]:
    if not isinstance(root_node, yaml.MappingNode):
        raise InvalidInput(f"requirements: {where} must be a mapping with a `dependencies:` list",
                           field="requirements")
    for key, value in root_node.value:
        if key.value == "dependencies":
            if not isinstance(value, yaml.SequenceNode):
                raise _bad_line(where, value.start_mark.line + 1, "`dependencies` must be a list")
            return list(value.value)
    return []


def parse_conda_text(text: str, where: str = "conda.yaml") -> Requirements:
    """The pip requirements of a conda environment YAML: its ``- pip:`` list, plus conda
    packages with an obvious pip name; Python and pip themselves are dropped, other
    conda-only packages are ignored with a note."""
    out: list[str] = []
    notes: list[str] = []
    for item in _conda_dependencies(_conda_node(text, where), where):
        line = item.start_mark.line + 1
        if isinstance(item, yaml.ScalarNode):
            m = _CONDA_SPEC_RE.match(str(item.value).strip())
            name = m["name"].lower() if m else ""
            pip = conda_to_pip(str(item.value))
            if pip is not None:
                out.append(pip)
            elif name not in CONDA_IGNORED:
                notes.append(f"{where} line {line}: conda package {item.value!r} ignored (no obvious pip name); "
                             "add it under `- pip:` if the model needs it")
        elif isinstance(item, yaml.MappingNode):
            for key, value in item.value:
                if key.value != "pip" or not isinstance(value, yaml.SequenceNode):
                    raise _bad_line(where, key.start_mark.line + 1, f"unexpected {key.value!r} entry; "
                                    "the only mapping allowed in `dependencies` is `- pip: [...]`")
                for req_node in value.value:
                    req = parse_requirement_line(str(req_node.value), where, req_node.start_mark.line + 1)
                    if req is not None:
                        out.append(req)
    return Requirements(tuple(dict.fromkeys(out)), where, tuple(notes))


def _looks_like_conda(text: str) -> bool:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and "dependencies" in doc


def load_requirements(root: Path, given_file_text: str | None = None) -> Requirements:
    """Requirements from ``given_file_text`` when given (requirements.txt or conda YAML
    text), else from ``requirements.txt`` at the root, else from a conda YAML there
    (conda.yaml, environment.yml...), else none."""
    if given_file_text is not None:
        if _looks_like_conda(given_file_text):
            return parse_conda_text(given_file_text, "given requirements")._replace(source="given")
        return Requirements(parse_requirements_text(given_file_text, "given requirements"), "given")
    for name in (REQUIREMENTS_FILE, *CONDA_FILES):
        path = root / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"requirements: {name} is not UTF-8 text; save it as UTF-8",
                               field="requirements") from None
        if name == REQUIREMENTS_FILE:
            return Requirements(parse_requirements_text(text, name), name)
        return parse_conda_text(text, name)
    return Requirements((), "none", (f"no {REQUIREMENTS_FILE} or conda YAML found: the model gets only the "
                                     "scoring image's packages",))


def read_requirements(root: Path, given_file_text: str | None = None) -> tuple[str, ...]:
    """The version's pip requirements (see ``load_requirements``); notes are logged."""
    result = load_requirements(root, given_file_text)
    for note in result.notes:
        log.info("requirements: %s", note)
    return result.requirements

