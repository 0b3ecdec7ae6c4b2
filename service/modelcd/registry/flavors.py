"""How a version's files are served: their flavor and model file or entry script, found by
reading the files (an entry script is parsed, never imported or run)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from modelcd.domain import Flavor
from modelcd.errors import InvalidInput
from modelcd.registry.archive import iter_tree, safe_relpath
from modelcd.registry.yaml_errors import yaml_problem

DEFAULT_ENTRY_SCRIPT = "score.py"
ENTRY_FUNCTIONS = ("init", "run")
MODEL_SUFFIXES: dict[Flavor, tuple[str, ...]] = {
    Flavor.ONNX: (".onnx",),
    Flavor.SKLEARN: (".pkl", ".pickle", ".joblib", ".skops"),
}
PYFUNC_FLAVOR = "python_function"  # the MLmodel flavor every MLflow model is served by
_KNOWN_FLAVORS = ", ".join(f.value for f in Flavor if f is not Flavor.NONE)


class DetectedFlavor(NamedTuple):
    """How a version is served: ``model_file`` is set for sklearn/onnx (the model's file) and
    pyfunc (the ``MLmodel`` file), ``entry_script`` for custom; both are relative posix paths
    inside the version's files."""

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


def read_mlmodel(path: Path, shown_as: str) -> dict[str, Any]:
    """An ``MLmodel`` file as a mapping ({} when it is not one); InvalidInput when it is not
    YAML."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InvalidInput(f"flavor: {shown_as} is not valid MLflow YAML ({yaml_problem(e)}); re-save the "
                           "model with mlflow, or remove MLmodel and set `flavor`", field="flavor") from None
    return doc if isinstance(doc, dict) else {}


def pyfunc_conf(mlmodel: dict[str, Any]) -> dict[str, Any] | None:
    """The ``python_function`` flavor of a parsed ``MLmodel``: what MLflow serves any model by."""
    flavors = mlmodel.get("flavors")
    conf = flavors.get(PYFUNC_FLAVOR) if isinstance(flavors, dict) else None
    return conf if isinstance(conf, dict) and isinstance(conf.get("loader_module"), str) else None


def _mlmodel_file(root: Path, files: list[str], flavor: Flavor | None) -> tuple[Flavor, str] | None:
    """The model file an MLflow ``MLmodel`` names (sklearn ``pickled_model`` or onnx ``data``),
    else the ``MLmodel`` itself when it has a ``python_function`` flavor (pyfunc)."""
    mlmodels = [f for f in files if f.rsplit("/", 1)[-1] == "MLmodel"]
    if len(mlmodels) != 1:
        return None
    doc = read_mlmodel(root / mlmodels[0], mlmodels[0])
    flavors = doc.get("flavors")
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
    if flavor in (None, Flavor.PYFUNC) and pyfunc_conf(doc) is not None:
        return Flavor.PYFUNC, mlmodels[0]
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
    ``run`` (checked by parsing); else the model file an MLflow ``MLmodel`` names (its sklearn
    or onnx flavor), or ``pyfunc`` for any other MLflow model with a ``python_function``
    flavor (served by MLflow in the version's own environment); else
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
    if flavor is Flavor.PYFUNC:
        raise InvalidInput("flavor: pyfunc needs one MLflow MLmodel file with a python_function flavor, found "
                           f"none among: {_listing(files)}; save the model with mlflow (mlflow.<flavor>.save_model "
                           "or log_model) and register the whole folder", field="flavor")
    if flavor is not None:
        return DetectedFlavor(flavor, _one_model_file(files, flavor), None)
    return _auto_model_file(files, score_hint)

