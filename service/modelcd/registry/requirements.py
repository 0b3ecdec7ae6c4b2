"""A version's Python requirements, read from its requirements.txt or conda YAML (or given
as text), each line checked and normalised to PEP 508; for an MLflow pyfunc model, from the
environment its ``MLmodel`` names (python_env.yaml, else requirements.txt, else conda.yaml),
with the Python version it was saved with."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml
from packaging.requirements import InvalidRequirement, Requirement

from modelcd.errors import InvalidInput
from modelcd.registry.yaml_errors import yaml_problem

log = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements.txt"
PYTHON_ENV_FILE = "python_env.yaml"  # MLflow's virtualenv spec: python, build_dependencies, dependencies
MLFLOW_PACKAGES = ("mlflow", "mlflow-skinny")
# mlflow.pyfunc imports these, and mlflow-skinny does not bring them
PYFUNC_SERVING_PACKAGES = ("numpy", "pandas")
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



# -- MLflow pyfunc models ------------------------------------------------------------------


class PyfuncEnvironment(NamedTuple):
    """What an MLflow model needs to be served by ``mlflow.pyfunc``: its requirements with
    ``mlflow`` as ``mlflow-skinny`` (``source`` and ``notes`` as in ``Requirements``) and the
    Python version it was saved with (None when the files do not say)."""

    requirements: tuple[str, ...]
    source: str
    python: str | None
    notes: tuple[str, ...] = ()


def _read_text(root: Path, rel: str) -> str:
    try:
        return (root / rel).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"requirements: {rel} is not UTF-8 text; save it as UTF-8", field="requirements") from None


def _inside(root: Path, base: str, name: str, where: str) -> str:
    """``base/name`` as a path inside ``root`` that exists; InvalidInput otherwise."""
    from modelcd.registry.archive import safe_relpath

    try:
        rel = safe_relpath(f"{base}/{name}" if base else name)
    except ValueError as e:
        raise InvalidInput(f"requirements: {where} names {name!r}, which {e}; re-save the model with mlflow",
                           field="requirements") from None
    if rel is None or not (root / rel).is_file():
        raise InvalidInput(f"requirements: {where} names {name!r}, which is not among the model's files; "
                           "include it", field="requirements")
    return rel


def parse_python_env(root: Path, rel: str) -> tuple[str | None, tuple[str, ...]]:
    """(python version, requirements) of an MLflow ``python_env.yaml`` at ``rel``: its
    ``dependencies``, where ``-r FILE`` reads a requirements file beside it;
    ``build_dependencies`` (pip, setuptools, wheel pins) are the installer's business."""
    try:
        doc = yaml.safe_load(_read_text(root, rel))
    except yaml.YAMLError as e:
        raise InvalidInput(f"requirements: {rel} is not valid YAML ({yaml_problem(e)}); re-save the model with "
                           "mlflow", field="requirements") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"requirements: {rel} must be a mapping with `python:` and `dependencies:`",
                           field="requirements")
    deps = doc.get("dependencies") or []
    if not isinstance(deps, list):
        raise InvalidInput(f"requirements: {rel}: `dependencies` must be a list", field="requirements")
    base = rel.rpartition("/")[0]
    out: list[str] = []
    for number, dep in enumerate(deps, start=1):
        text = str(dep).strip()
        option = re.match(r"^(?:-r|--requirement)(?:\s+|=)(?P<file>\S.*)$", text)
        if option:
            included = _inside(root, base, option["file"].strip(), rel)
            out.extend(parse_requirements_text(_read_text(root, included), included))
            continue
        req = parse_requirement_line(text, f"{rel} dependencies", number)
        if req is not None:
            out.append(req)
    python = doc.get("python")
    return (str(python).strip() or None) if python is not None else None, tuple(dict.fromkeys(out))


def _python_from_conda(root: Path, rel: str) -> str | None:
    """The ``python=X.Y.Z`` pin of a conda YAML, if any."""
    try:
        doc = yaml.safe_load(_read_text(root, rel))
    except yaml.YAMLError:
        return None
    deps = doc.get("dependencies") if isinstance(doc, dict) else None
    for dep in deps if isinstance(deps, list) else ():
        m = _CONDA_SPEC_RE.match(str(dep).strip()) if isinstance(dep, str) else None
        if m and m["name"].lower() == "python":
            version = m["spec"].lstrip("=<>~! ").split("=")[0].strip()
            return version or None
    return None


def req_name(requirement: str) -> str:
    """The normalised (PEP 503) project name of a requirement string."""
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def pyfunc_requirements(requirements: tuple[str, ...], mlflow_version: str | None) -> tuple[tuple[str, ...],
                                                                                             tuple[str, ...]]:
    """(requirements, notes) to serve an MLflow model with ``mlflow.pyfunc``: ``mlflow`` becomes
    ``mlflow-skinny`` with the same version and markers (the tracking server's Flask,
    SQLAlchemy... are not needed to serve); with no MLflow named, ``mlflow-skinny`` at the
    ``MLmodel``'s ``mlflow_version``; numpy and pandas are added when absent."""
    out: list[str] = []
    notes: list[str] = []
    for line in requirements:
        req = Requirement(line)
        if req_name(line) == "mlflow":
            skinny = Requirement(line)
            skinny.name = "mlflow-skinny"
            skinny.extras = set()
            out.append(str(skinny))
            notes.append(f"{line!r} served as {str(skinny)!r}: serving needs only MLflow's client side")
        else:
            out.append(str(req))
    names = {req_name(r) for r in out}
    if not names & set(MLFLOW_PACKAGES):
        pin = f"=={mlflow_version}" if mlflow_version and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", mlflow_version) \
            else ""
        out.append(f"mlflow-skinny{pin}")
        notes.append(f"the requirements name no MLflow: added 'mlflow-skinny{pin}' (the MLmodel's mlflow_version)")
    out.extend(p for p in PYFUNC_SERVING_PACKAGES if p not in names)
    return tuple(dict.fromkeys(out)), tuple(notes)


def load_pyfunc_environment(root: Path, mlmodel_rel: str, mlmodel: dict[str, Any],
                            given_file_text: str | None = None) -> PyfuncEnvironment:
    """The environment of the MLflow model whose ``MLmodel`` is ``mlmodel_rel`` under ``root``:
    the requirements given, else those of the ``python_env.yaml`` it names, else its
    requirements.txt or conda YAML (see ``load_requirements``), made servable by
    ``pyfunc_requirements``; and its Python version (python_env.yaml, else the
    ``python_function`` flavor's ``python_version``, else the conda YAML's)."""
    base = mlmodel_rel.rpartition("/")[0]
    folder = root / base if base else root
    flavors = mlmodel.get("flavors")
    conf = flavors.get("python_function") if isinstance(flavors, dict) else None
    conf = conf if isinstance(conf, dict) else {}
    env = conf.get("env") if isinstance(conf.get("env"), dict) else {}
    python: str | None = None
    found: Requirements | None = None
    virtualenv = env.get("virtualenv") if isinstance(env.get("virtualenv"), str) else None
    if virtualenv is None and (folder / PYTHON_ENV_FILE).is_file():
        virtualenv = PYTHON_ENV_FILE
    if virtualenv is not None:
        rel = _inside(root, base, virtualenv, mlmodel_rel)
        python, reqs = parse_python_env(root, rel)
        found = Requirements(reqs, rel)
    if given_file_text is not None or found is None:
        found = load_requirements(folder, given_file_text)
    if python is None and isinstance(conf.get("python_version"), str | float):
        python = str(conf["python_version"])
    if python is None:
        conda = env.get("conda") if isinstance(env.get("conda"), str) else None
        for name in ([conda] if conda else []) + list(CONDA_FILES):
            if (folder / name).is_file():
                python = _python_from_conda(folder, name)
                break
    version = mlmodel.get("mlflow_version")
    reqs, notes = pyfunc_requirements(found.requirements, str(version) if version is not None else None)
    return PyfuncEnvironment(reqs, found.source, python, (*found.notes, *notes))


def python_minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version such as ``3.11.7`` or ``3.11``; None when it is not one."""
    m = re.match(r"^\s*(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else None
