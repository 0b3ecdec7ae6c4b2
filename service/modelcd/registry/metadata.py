"""What a model version's files say about themselves: their flavor and model file or entry
script, their Python requirements, and the input sample (with its expected output) that
smoke tests and the scoring server's swagger use. Pure functions: they read files, never
import or run them."""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml
from packaging.requirements import InvalidRequirement, Requirement

from modelcd.domain import Flavor
from modelcd.errors import InvalidInput, PayloadTooLarge
from modelcd.registry.archive import iter_tree, safe_relpath

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- flavor

DEFAULT_ENTRY_SCRIPT = "score.py"
ENTRY_FUNCTIONS = ("init", "run")
MODEL_SUFFIXES: dict[Flavor, tuple[str, ...]] = {
    Flavor.ONNX: (".onnx",),
    Flavor.SKLEARN: (".pkl", ".pickle", ".joblib", ".skops"),
}
_KNOWN_FLAVORS = ", ".join(f.value for f in Flavor if f is not Flavor.NONE)


class DetectedFlavor(NamedTuple):
    """How a version is served: ``model_file`` is set for sklearn/onnx, ``entry_script`` for
    custom; both are relative posix paths inside the version's files."""

    flavor: Flavor
    model_file: str | None
    entry_script: str | None


def parse_flavor(given: str | None) -> Flavor | None:
    """The Flavor named by ``given`` (case-insensitive), None when not given; InvalidInput
    listing the known flavors otherwise."""
    if given is None or given.strip() == "":
        return None
    try:
        flavor = Flavor(given.strip().lower())
        if flavor is not Flavor.NONE:  # "none" marks referenced-only versions; nobody registers it
            return flavor
    except ValueError:
        pass
    raise InvalidInput(f"flavor: unknown flavor {given!r}; known flavors: {_KNOWN_FLAVORS} "
                       "(or leave it out to detect it from the files)", field="flavor")


def defined_names(source: str, filename: str) -> set[str]:
    """Names a Python module binds at top level (def, class, assignment, import), found by
    parsing, never importing. A syntax error is InvalidInput naming the file and line."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise InvalidInput(f"entry_script: {filename}, line {e.lineno}: {e.msg}; fix the syntax error "
                           "(it must be valid Python 3)", field="entry_script") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _read_script(root: Path, rel: str) -> str:
    path = root / rel
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"entry_script: {rel} is not UTF-8 text ({e.reason} at byte {e.start}); "
                           "save it as UTF-8", field="entry_script") from None


def _missing_entry_functions(root: Path, rel: str) -> list[str]:
    names = defined_names(_read_script(root, rel), rel)
    return [f for f in ENTRY_FUNCTIONS if f not in names]


def _check_entry_script(root: Path, entry_script: str) -> str:
    """The normalised path of an entry script that exists and defines init() and run()."""
    try:
        rel = safe_relpath(entry_script)
    except ValueError as e:
        raise InvalidInput(f"entry_script: {entry_script!r} {e}; give a path relative to the model files, "
                           "e.g. 'score.py'", field="entry_script") from None
    if rel is None or not (root / rel).is_file():
        raise InvalidInput(f"entry_script: {entry_script!r} is not a file in the model files; add it, or give "
                           "the path of the script (relative to the model files) that defines init() and run()",
                           field="entry_script")
    missing = _missing_entry_functions(root, rel)
    if missing:
        need = " and ".join(f"{f}()" for f in missing)
        raise InvalidInput(f"entry_script: {rel} does not define {need}; a custom entry script defines "
                           "`def init():` (load the model) and `def run(raw_data):` (return predictions)",
                           field="entry_script")
    return rel


def _visible_files(root: Path) -> list[str]:
    """Regular files under ``root``, skipping hidden files and folders and ``__pycache__``."""
    out = []
    for entry in iter_tree(root):
        parts = entry.rel.split("/")
        if entry.is_dir or any(p.startswith(".") or p == "__pycache__" for p in parts):
            continue
        out.append(entry.rel)
    return out


def yaml_problem(e: Exception) -> str:
    """A one-line description of a YAML (or decoding) error, with its line number."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or type(e).__name__
    return f"{problem} at line {mark.line + 1}" if mark is not None else str(problem)


def _mlmodel_file(root: Path, files: list[str], flavor: Flavor | None) -> tuple[Flavor, str] | None:
    """The model file an MLflow ``MLmodel`` names (sklearn ``pickled_model`` or onnx ``data``)."""
    mlmodels = [f for f in files if f.rsplit("/", 1)[-1] == "MLmodel"]
    if len(mlmodels) != 1:
        return None
    try:
        doc = yaml.safe_load((root / mlmodels[0]).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InvalidInput(f"flavor: {mlmodels[0]} is not valid MLflow YAML ({yaml_problem(e)}); re-save the "
                           "model with mlflow, or remove MLmodel and set `flavor`", field="flavor") from None
    flavors = doc.get("flavors") if isinstance(doc, dict) else None
    if not isinstance(flavors, dict):
        return None
    base = mlmodels[0].rpartition("/")[0]
    for name, key in ((Flavor.SKLEARN, "pickled_model"), (Flavor.ONNX, "data")):
        conf = flavors.get(name.value)
        if flavor not in (None, name) or not isinstance(conf, dict) or not isinstance(conf.get(key), str):
            continue
        try:
            rel = safe_relpath(f"{base}/{conf[key]}" if base else conf[key])
        except ValueError as e:
            raise InvalidInput(f"flavor: {mlmodels[0]} names model file {conf[key]!r}, which {e}; "
                               "re-save the model with mlflow", field="flavor") from None
        if rel not in files:
            raise InvalidInput(f"flavor: {mlmodels[0]} names model file {conf[key]!r}, which is missing; "
                               "include it in the model files", field="flavor")
        return name, rel
    return None


def _candidates(files: list[str], flavor: Flavor) -> list[str]:
    return [f for f in files if f.lower().endswith(MODEL_SUFFIXES[flavor])]


def _listing(files: list[str], limit: int = 10) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "") if files else "none"


def _one_model_file(files: list[str], flavor: Flavor) -> str:
    """The single model file of ``flavor``; InvalidInput when there are none or several."""
    found = _candidates(files, flavor)
    kinds = "/".join(f"*{s}" for s in MODEL_SUFFIXES[flavor])
    if len(found) == 1:
        return found[0]
    if not found:
        raise InvalidInput(f"flavor: {flavor.value} needs one {kinds} file, found none among: {_listing(files)}; "
                           "add the model file, or set another `flavor`", field="flavor")
    raise InvalidInput(f"flavor: {flavor.value} needs exactly one {kinds} file, found {len(found)}: "
                       f"{_listing(found)}; keep only the model's file, or add a {DEFAULT_ENTRY_SCRIPT} with "
                       "init() and run() and set flavor 'custom'", field="flavor")


def _auto_model_file(files: list[str], score_hint: str) -> DetectedFlavor:
    """Pick onnx or sklearn from the files alone, or explain why not."""
    onnx, pickles = _candidates(files, Flavor.ONNX), _candidates(files, Flavor.SKLEARN)
    if len(onnx) == 1 and not pickles:
        return DetectedFlavor(Flavor.ONNX, onnx[0], None)
    if len(pickles) == 1 and not onnx:
        return DetectedFlavor(Flavor.SKLEARN, pickles[0], None)
    if onnx and pickles:
        raise InvalidInput(f"flavor: cannot tell the flavor: found ONNX files ({_listing(onnx)}) and pickles "
                           f"({_listing(pickles)}); set `flavor` (--flavor onnx or --flavor sklearn), or keep "
                           "only the model's file", field="flavor")
    if onnx or pickles:
        return DetectedFlavor(Flavor.ONNX if onnx else Flavor.SKLEARN, _one_model_file(
            files, Flavor.ONNX if onnx else Flavor.SKLEARN), None)
    raise InvalidInput(f"flavor: no model found: expected a {DEFAULT_ENTRY_SCRIPT} defining init() and run() "
                       "(custom), one *.onnx file (onnx) or one *.pkl/*.pickle/*.joblib/*.skops file (sklearn)"
                       f"{score_hint}; "
                       f"files: {_listing(files)}. Add one, or set `flavor` and `entry_script`", field="flavor")


def detect_flavor(root: Path, given: str | None = None, entry_script: str | None = None) -> DetectedFlavor:
    """Decide how the files under ``root`` are served.

    ``custom`` when ``entry_script`` (default ``score.py`` at the root) defines ``init`` and
    ``run`` (checked by parsing); else the model file an MLflow ``MLmodel`` names; else
    ``onnx`` for exactly one ``*.onnx``, ``sklearn`` for exactly one pickle/joblib. ``given``
    forces a flavor. Ambiguity, nothing found, an unknown flavor or a broken entry script
    raise InvalidInput saying what to change."""
    flavor = parse_flavor(given)
    if entry_script is not None and flavor not in (None, Flavor.CUSTOM):
        raise InvalidInput(f"entry_script: an entry script is only used with flavor 'custom', not "
                           f"{flavor.value!r}; drop the entry script or set flavor 'custom'", field="entry_script")
    if flavor is Flavor.CUSTOM or entry_script is not None:
        return DetectedFlavor(Flavor.CUSTOM, None, _check_entry_script(root, entry_script or DEFAULT_ENTRY_SCRIPT))
    files = _visible_files(root)
    score_hint = ""
    if flavor is None and DEFAULT_ENTRY_SCRIPT in files:
        missing = _missing_entry_functions(root, DEFAULT_ENTRY_SCRIPT)
        if not missing:
            return DetectedFlavor(Flavor.CUSTOM, None, DEFAULT_ENTRY_SCRIPT)
        score_hint = f" ({DEFAULT_ENTRY_SCRIPT} is there but defines no {' or '.join(m + '()' for m in missing)})"
    from_mlmodel = _mlmodel_file(root, files, flavor)
    if from_mlmodel is not None:
        return DetectedFlavor(from_mlmodel[0], from_mlmodel[1], None)
    if flavor is not None:
        return DetectedFlavor(flavor, _one_model_file(files, flavor), None)
    return _auto_model_file(files, score_hint)


# --------------------------------------------------------------------------- requirements

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


# --------------------------------------------------------------------------- sample and expected output

MAX_SAMPLE_BYTES = 1024 * 1024
SAMPLE_KEYS = ("data", "dataframe_split", "dataframe_records", "instances", "inputs")
EXTRA_SAMPLE_KEYS = ("params",)  # MLflow's inference parameters may ride along
SAMPLE_SHAPES = ('{"data": [[...], ...]}, {"dataframe_split": {"columns": [...], "data": [[...], ...]}}, '
                 '{"dataframe_records": [{...}, ...]}, {"instances": [...]}, {"inputs": ...}, '
                 "or a bare list of rows")


def _bad(field: str, problem: str, fix: str) -> InvalidInput:
    return InvalidInput(f"{field}: {problem}; {fix}", field=field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(value: Any, field: str, fix: str) -> Any:
    """Decode JSON text (str or bytes), or check an already decoded value is plain JSON."""
    if isinstance(value, bytes | bytearray | str):
        if len(value) > MAX_SAMPLE_BYTES:
            raise PayloadTooLarge(f"{field}: {len(value)} bytes (at most {MAX_SAMPLE_BYTES}); use a few rows",
                                  field=field)
        try:
            return json.loads(value, parse_constant=_reject_constant)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _bad(field, f"not valid JSON ({e})", fix) from None
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise _bad(field, f"not plain JSON ({e})", fix) from None
    if size > MAX_SAMPLE_BYTES:
        raise PayloadTooLarge(f"{field}: {size} bytes as JSON (at most {MAX_SAMPLE_BYTES}); use a few rows",
                              field=field)
    return value


def _check_rows(rows: Any, key: str, field: str, fix: str) -> None:
    """``rows`` is a non-empty list of rows of one kind: all lists of one width, all
    objects, or all scalars."""
    if not isinstance(rows, list) or not rows:
        raise _bad(field, f"{key!r} must be a non-empty list of rows", fix)
    if all(isinstance(r, list) for r in rows):
        widths = sorted({len(r) for r in rows})
        if len(widths) > 1:
            raise _bad(field, f"{key!r} is ragged: rows have {', '.join(map(str, widths))} values", fix)
        if widths == [0]:
            raise _bad(field, f"{key!r} rows are empty", fix)
    elif not (all(isinstance(r, dict) for r in rows) or not any(isinstance(r, list | dict) for r in rows)):
        raise _bad(field, f"{key!r} mixes lists, objects and values", fix)


def _check_split(split: Any, field: str, fix: str) -> None:
    if not isinstance(split, dict):
        raise _bad(field, "'dataframe_split' must be an object with 'columns' and 'data'", fix)
    unknown = sorted(set(split) - {"columns", "data", "index"})
    if unknown:
        raise _bad(field, f"'dataframe_split' has unknown keys {unknown} (allowed: columns, data, index)", fix)
    rows = split.get("data")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise _bad(field, "'dataframe_split.data' must be a non-empty list of row lists", fix)
    _check_rows(rows, "dataframe_split.data", field, fix)
    columns = split.get("columns")
    if columns is not None and (not isinstance(columns, list) or len(columns) != len(rows[0])):
        raise _bad(field, f"'dataframe_split.columns' must list one name per value ({len(rows[0])})", fix)
    index = split.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(rows)):
        raise _bad(field, f"'dataframe_split.index' must list one label per row ({len(rows)})", fix)


def _check_body(body: dict[str, Any], field: str, fix: str) -> None:
    keys = [k for k in body if k in SAMPLE_KEYS]
    unknown = sorted(k for k in body if k not in SAMPLE_KEYS and k not in EXTRA_SAMPLE_KEYS)
    if unknown or len(keys) != 1:
        got = ", ".join(map(repr, body)) or "no keys"
        raise _bad(field, f"expected exactly one of {', '.join(SAMPLE_KEYS)} (got {got})", fix)
    if "params" in body and not isinstance(body["params"], dict):
        raise _bad(field, "'params' must be an object", fix)
    key = keys[0]
    value = body[key]
    if key == "data":
        _check_rows(value, key, field, fix)
    elif key == "dataframe_split":
        _check_split(value, field, fix)
    elif key == "dataframe_records":
        if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
            raise _bad(field, "'dataframe_records' must be a non-empty list of objects", fix)
    elif key == "instances":
        if not isinstance(value, list) or not value:
            raise _bad(field, "'instances' must be a non-empty list", fix)
    elif value is None or value == [] or value == {}:
        raise _bad(field, "'inputs' is empty", fix)


def parse_sample(value: Any, field: str = "sample") -> dict[str, Any] | None:
    """The input sample as a scoring request body (None stays None). ``value`` is JSON text
    or its decoded value: one of ``{"data": [...]}``, ``{"dataframe_split": {...}}``,
    ``{"dataframe_records": [...]}``, ``{"instances": [...]}``, ``{"inputs": ...}`` (optionally
    with ``"params"``); a bare list becomes ``{"data": list}``. Anything else is
    InvalidInput naming the accepted shapes."""
    if value is None:
        return None
    fix = f"send one of {SAMPLE_SHAPES}"
    body = _load_json(value, field, fix)
    if isinstance(body, list):
        body = {"data": body}
    if not isinstance(body, dict):
        raise _bad(field, f"a JSON {type(body).__name__} is not a request body", fix)
    _check_body(body, field, fix)
    return body


def sample_rows(sample: Mapping[str, Any]) -> int | None:
    """How many rows a parsed sample holds, when that can be told from its shape."""
    if "dataframe_split" in sample:
        return len(sample["dataframe_split"]["data"])
    for key in ("data", "dataframe_records", "instances"):
        if key in sample:
            return len(sample[key])
    inputs = sample.get("inputs")
    if isinstance(inputs, list):
        return len(inputs)
    if isinstance(inputs, dict) and inputs and all(isinstance(v, list) for v in inputs.values()):
        lengths = {len(v) for v in inputs.values()}
        return lengths.pop() if len(lengths) == 1 else None
    return None


def parse_expected(value: Any, sample: Mapping[str, Any] | None = None, field: str = "expected") -> list[Any] | None:
    """The expected predictions for the sample (None stays None): a JSON list, or
    ``{"predictions": [...]}``, with one entry per sample row when the row count is known."""
    if value is None:
        return None
    fix = 'send a JSON list with one prediction per sample row, or {"predictions": [...]}'
    expected = _load_json(value, field, fix)
    if isinstance(expected, dict) and set(expected) == {"predictions"}:
        expected = expected["predictions"]
    if not isinstance(expected, list):
        raise _bad(field, f"a JSON {type(expected).__name__} is not a list of predictions", fix)
    if not expected:
        raise _bad(field, "the list of predictions is empty", fix)
    rows = sample_rows(sample) if isinstance(sample, Mapping) else None
    if rows is not None and rows != len(expected):
        raise _bad(field, f"{len(expected)} predictions for a sample of {rows} rows", fix)
    return expected
