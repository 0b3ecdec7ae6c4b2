"""Registering versions: validate, store the files, and record the version together with
its ``model_version.registered`` outbox event in one transaction. Native registration and
every external source take this one path."""

from __future__ import annotations

import contextlib
import logging
import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError
from sqlalchemy import Connection, bindparam, func, select

from modelcd.domain import Flavor, ModelVersion, Source
from modelcd.errors import InvalidInput, NotFound, PayloadTooLarge
from modelcd.fsutil import atomic_dir, scratch_dir
from modelcd.registry.archive import safe_extract, tree_digest
from modelcd.registry.artifacts import ArtifactStore
from modelcd.registry.flavors import detect_flavor, read_mlmodel
from modelcd.registry.names import validate_description, validate_model_name, validate_tags
from modelcd.registry.requirements import load_pyfunc_environment, read_requirements
from modelcd.registry.samples import files_expected, mlmodel_sample, parse_expected, parse_sample
from modelcd.store import schema
from modelcd.store.db import Database, now
from modelcd.strict_json import strict_json_loads

REGISTERED = "model_version.registered"
NOT_RELEASED = "recorded without a release (referenced only, or not approved yet)"

log = logging.getLogger(__name__)


class RegisterMetadata(BaseModel):
    """What a caller may say about a version besides its files."""

    model_config = ConfigDict(extra="forbid")

    flavor: str | None = None
    requirements: str | None = Field(None, description="requirements.txt text; default: from the files")
    sample: Any | None = None
    expected: Any | None = None
    metrics: dict[str, FiniteFloat] = Field(default_factory=dict)  # NaN/Infinity: not JSON, refused
    tags: dict[str, str] = Field(default_factory=dict)
    description: str = ""
    source: Source = Source.NATIVE
    external_ref: str | None = None
    release: bool = Field(True, description="false: record the version without starting a release")


def parse_metadata(raw: str | bytes | dict[str, Any] | None) -> RegisterMetadata:
    """Parse the JSON metadata part of a registration; errors name the field."""
    if raw is None or raw == "" or raw == b"":
        return RegisterMetadata()
    if isinstance(raw, str | bytes):
        try:
            raw = strict_json_loads(raw)
        except ValueError as e:
            raise InvalidInput(f"metadata: not valid JSON ({e}); send a JSON object", field="metadata") from e
    if not isinstance(raw, dict):
        raise InvalidInput("metadata: must be a JSON object", field="metadata")
    try:
        return RegisterMetadata(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "metadata"
        hint = "; known fields: " + ", ".join(RegisterMetadata.model_fields) if err["type"] == "extra_forbidden" else ""
        raise InvalidInput(f"metadata.{loc}: {err['msg']}{hint}", field=loc) from None


def version_from_row(row: Any) -> ModelVersion:
    m = row._mapping
    return ModelVersion(
        model=m["model"], version=m["version"], digest=m["digest"], flavor=Flavor(m["flavor"]),
        model_file=m["model_file"], entry_script=m["entry_script"], requirements=tuple(m["requirements"]),
        sample=m["sample"], expected=m["expected"], metrics=dict(m["metrics"]), tags=dict(m["tags"]),
        description=m["description"], source=Source(m["source"]), external_ref=m["external_ref"],
        artifact_uri=m["artifact_uri"], size_bytes=m["size_bytes"], status=m["status"], created_at=m["created_at"],
    )


def _evaluation(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "model": row["model"], "version": row["version"], "data": row["data_uri"],
            "data_digest": row["data_digest"], "label": row["label"], "task": row["task"], "rows": row["rows"],
            "metrics": row["metrics"], **row["result"], "job_id": row["job_id"], "created_at": row["created_at"]}


def version_to_dict(v: ModelVersion) -> dict[str, Any]:
    return {
        "model": v.model, "version": v.version, "digest": v.digest, "flavor": str(v.flavor),
        "model_file": v.model_file, "entry_script": v.entry_script, "requirements": list(v.requirements),
        "sample": v.sample, "expected": v.expected, "metrics": v.metrics, "tags": v.tags,
        "description": v.description, "source": str(v.source), "external_ref": v.external_ref,
        "artifact_uri": v.artifact_uri, "size_bytes": v.size_bytes, "status": v.status, "created_at": v.created_at,
    }


def _pyfunc_metadata(files: Path, mlmodel_rel: str, meta: RegisterMetadata) -> tuple[tuple[str, ...], Any, Any]:
    """(requirements, sample, expected) of an MLflow model served by pyfunc: its environment
    (``load_pyfunc_environment``); the sample and expected output given, else its MLflow
    example and an ``expected.json`` beside its ``MLmodel``."""
    mlmodel = read_mlmodel(files / mlmodel_rel, mlmodel_rel)
    env = load_pyfunc_environment(files, mlmodel_rel, mlmodel, meta.requirements)
    for note in env.notes:
        log.info("requirements: %s", note)
    folder = (files / mlmodel_rel).parent
    if meta.sample is not None:
        sample = parse_sample(meta.sample)
    else:
        sample, note = mlmodel_sample(folder, mlmodel)
        if note:
            log.info("%s", note)
    if meta.expected is not None:
        expected = parse_expected(meta.expected, sample)
    else:
        expected = files_expected(folder, sample)
    return env.requirements, sample, expected


class Registry:
    """Models and their immutable, numbered versions."""

    def __init__(self, db: Database, store: ArtifactStore, home: Path, max_bytes: int) -> None:
        self.db = db
        self.store = store
        self.home = home
        self.max_bytes = max_bytes

    def register(self, name: str, archive: IO[bytes], meta: RegisterMetadata) -> ModelVersion:
        """Validate and record a new version from a tar.gz of its files. Either the version and
        its outbox event are both committed, or nothing of the request remains."""
        validate_model_name(name)
        with self._workdir() as work:
            files = work / "files"
            result = safe_extract(archive, files, self.max_bytes)
            return self._register_files(name, files, result.size_bytes, meta)

    def import_files(self, name: str, folder: Path, meta: RegisterMetadata) -> ModelVersion:
        """Record a version from files an external source fetched into ``folder`` (consumed).
        Idempotent on (model, source, external_ref): a redelivery returns the version it made."""
        validate_model_name(name)
        existing = self.find_external(name, meta)
        if existing is not None:
            return existing
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if size > self.max_bytes:
            raise PayloadTooLarge(f"{name}: the model's files are {size} bytes, over MODELCD_MAX_ARTIFACT_BYTES "
                                  f"({self.max_bytes})", field="artifact")
        return self._register_files(name, folder, size, meta)

    def register_reference(self, name: str, meta: RegisterMetadata) -> ModelVersion:
        """Record a version whose files stay in the external registry (nothing to deploy here)."""
        validate_model_name(name)
        existing = self.find_external(name, meta)
        if existing is not None:
            return existing
        self.check_meta(meta)
        return self._record(reference_row(name, meta), meta.release)

    def release_later(self, version: ModelVersion) -> bool:
        """Ask for a release of a version recorded earlier without one (e.g. a SageMaker package
        pending approval, now approved). False when it already has a release or a queued request."""
        if version.status != "ready":
            return False
        with self.db.write() as conn:
            return release_later_in(conn, version)

    def find_external(self, name: str, meta: RegisterMetadata) -> ModelVersion | None:
        if not meta.external_ref:
            return None
        with self.db.read() as conn:
            return find_external_in(conn, [(name, str(meta.source), meta.external_ref)]).get(
                (name, str(meta.source), meta.external_ref))

    @staticmethod
    def check_meta(meta: RegisterMetadata) -> None:
        validate_tags(meta.tags)
        validate_description(meta.description)

    def _workdir(self) -> AbstractContextManager[Path]:
        """Where an upload is unpacked: a temporary under ``home/tmp`` that a restart clears
        (``fsutil.clean_temporaries``) if this process dies before removing it."""
        return scratch_dir(self.home / "tmp", "register")

    def _register_files(self, name: str, files: Path, size: int, meta: RegisterMetadata) -> ModelVersion:
        self.check_meta(meta)
        digest = tree_digest(files)
        flavor, model_file, entry_script = detect_flavor(files, meta.flavor)
        if flavor is Flavor.PYFUNC and model_file is not None:
            requirements, sample, expected = _pyfunc_metadata(files, model_file, meta)
        else:
            requirements = read_requirements(files, meta.requirements)
            sample = parse_sample(meta.sample) if meta.sample is not None else None
            expected = parse_expected(meta.expected, sample) if meta.expected is not None else None
        uri = self.store.put_tree(f"{name}/{digest}", files)
        try:
            row = version_row(name, meta, digest=digest, flavor=str(flavor), model_file=model_file,
                              entry_script=entry_script, requirements=list(requirements), sample=sample,
                              expected=expected, artifact_uri=uri, size_bytes=size)
            version = self._record(row, meta.release)
        except Exception:
            if not self._uri_referenced(uri):
                self.store.delete(uri)
            raise
        self._cache_files(digest, files)
        return version

    def _record(self, row: dict[str, Any], release: bool) -> ModelVersion:
        """Record one ``version_row`` (numbered here) with its outbox event in one transaction."""
        with self.db.write() as conn:
            record_versions(conn, [row], [release])
        return self.get_version(row["model"], row["version"])

    def _uri_referenced(self, uri: str) -> bool:
        with self.db.read() as conn:
            return conn.execute(select(schema.versions.c.version)
                                .where(schema.versions.c.artifact_uri == uri)).first() is not None

    def _cache_files(self, digest: str, files: Path) -> None:
        dest = self.files_dir(digest)
        if dest.exists():
            return
        with contextlib.suppress(FileExistsError), atomic_dir(dest) as tmp:  # exists: cached meanwhile
            shutil.copytree(files, tmp, dirs_exist_ok=True)

    def files_dir(self, digest: str) -> Path:
        return self.home / "files" / digest

    def materialize(self, version: ModelVersion) -> Path:
        """The version's files on local disk (fetched from the artifact store once per digest)."""
        dest = self.files_dir(version.digest)
        if not dest.exists():
            with contextlib.suppress(FileExistsError), atomic_dir(dest) as tmp:  # exists: fetched meanwhile
                self.store.get_tree(version.artifact_uri, tmp)
                if tree_digest(tmp) != version.digest:
                    raise InvalidInput(f"artifact {version.artifact_uri} does not match digest {version.digest}")
        return dest

    def get_version(self, name: str, number: int) -> ModelVersion:
        with self.db.read() as conn:
            row = conn.execute(select(schema.versions).where(
                schema.versions.c.model == name, schema.versions.c.version == number)).first()
        if row is None:
            raise NotFound(f"model {name!r} has no version {number}; list them with `modelcd versions {name}`",
                           field="version")
        return version_from_row(row)

    def put_statistics(self, name: str, number: int, stats: dict[str, Any], *, source: str,
                       job_id: str | None = None) -> dict[str, Any]:
        """Store the training-data statistics of a version (``DatasetStats.to_dict()``),
        replacing any it had; returns them as ``get_statistics`` does."""
        self.get_version(name, number)
        values = {"stats": stats, "rows": int(stats["rows"]), "features": len(stats["features"]),
                  "source": source[:256], "job_id": job_id, "created_at": now()}
        table = schema.version_statistics
        with self.db.write() as conn:
            conn.execute(table.delete().where(table.c.model == name, table.c.version == number))
            conn.execute(table.insert().values(model=name, version=number, **values))
        return self.get_statistics(name, number)

    def get_statistics(self, name: str, number: int) -> dict[str, Any]:
        """{model, version, rows, features, source, job_id, created_at, statistics} of a
        version; NotFound (naming the fix) when none were computed."""
        table = schema.version_statistics
        with self.db.read() as conn:
            row = conn.execute(select(table).where(table.c.model == name, table.c.version == number)).first()
        if row is None:
            self.get_version(name, number)
            raise NotFound(f"{name} v{number} has no training statistics; compute them from its training data: "
                           f"`modelcd statistics {name} {number} --training-data FILE` (CSV, Parquet or JSON lines)",
                           field="statistics")
        m = dict(row._mapping)
        return {"model": m["model"], "version": m["version"], "rows": m["rows"], "features": m["features"],
                "source": m["source"], "job_id": m["job_id"], "created_at": m["created_at"],
                "statistics": m["stats"]}

    def put_evaluation(self, name: str, number: int, *, data_uri: str, data_digest: str | None, label: str,
                       result: dict[str, Any], job_id: str | None) -> dict[str, Any]:
        """Store an evaluation of the version (``batch.evaluation``'s result); returns it as
        ``evaluations`` lists it."""
        self.get_version(name, number)
        table = schema.version_evaluations
        row = {"model": name, "version": number, "data_uri": data_uri, "data_digest": data_digest, "label": label,
               "task": result["task"], "rows": result["rows"], "metrics": result["metrics"],
               "result": {k: v for k, v in result.items() if k not in ("task", "rows", "metrics")},
               "job_id": job_id, "created_at": now()}
        with self.db.write() as conn:
            row["id"] = conn.execute(table.insert().values(**row)).inserted_primary_key[0]
        return _evaluation(row)

    def evaluations(self, name: str, number: int, limit: int = 20, *, data_uri: str | None = None,
                    label: str | None = None) -> list[dict[str, Any]]:
        """The version's evaluations, newest first (only those of ``data_uri`` / ``label`` when given)."""
        self.get_version(name, number)
        table = schema.version_evaluations
        q = select(table).where(table.c.model == name, table.c.version == number)
        if data_uri is not None:
            q = q.where(table.c.data_uri == data_uri)
        if label is not None:
            q = q.where(table.c.label == label)
        with self.db.read() as conn:
            rows = conn.execute(q.order_by(table.c.id.desc()).limit(limit)).mappings().all()
        return [_evaluation(dict(r)) for r in rows]

    def list_versions(self, name: str) -> list[ModelVersion]:
        self.get_model(name)
        with self.db.read() as conn:
            rows = conn.execute(select(schema.versions).where(schema.versions.c.model == name)
                                .order_by(schema.versions.c.version))
            return [version_from_row(r) for r in rows]

    def get_model(self, name: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute(select(schema.models).where(schema.models.c.name == name)).first()
            if row is None:
                raise NotFound(f"model {name!r} not found; list models with `modelcd models`", field="name")
            latest = conn.execute(select(func.max(schema.versions.c.version))
                                  .where(schema.versions.c.model == name)).scalar()
        return {**dict(row._mapping), "latest_version": latest}

    def list_models(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(schema.models, func.max(schema.versions.c.version).label("latest_version"),
                       func.count(schema.versions.c.version).label("versions"))
                .select_from(schema.models.outerjoin(schema.versions, schema.versions.c.model == schema.models.c.name))
                .group_by(schema.models.c.name).order_by(schema.models.c.name))
            return [dict(r._mapping) for r in rows]


# Statements the inbox runs for every batch, built once (SQLAlchemy then only looks up their
# compiled form): a flood of deliveries spent most of its time building statements.
_NAMES = bindparam("names", expanding=True)
# Each model's last number through a correlated max(), which reads one index entry per model
# (a GROUP BY over the models' versions reads all of them).
_LAST_VERSIONS = select(schema.models.c.name, select(func.max(schema.versions.c.version))
                        .where(schema.versions.c.model == schema.models.c.name).scalar_subquery()
                        ).where(schema.models.c.name.in_(_NAMES))
_EXTERNAL_IN = select(schema.versions).where(  # all three columns of uq_versions_external: index lookups only
    schema.versions.c.model.in_(_NAMES), schema.versions.c.source.in_(bindparam("sources", expanding=True)),
    schema.versions.c.external_ref.in_(bindparam("refs", expanding=True)))
_INSERT_MODELS = schema.models.insert()
_INSERT_VERSIONS = schema.versions.insert()
_INSERT_OUTBOX = schema.outbox.insert()


def version_row(name: str, meta: RegisterMetadata, **columns: Any) -> dict[str, Any]:
    """The ``versions`` row of a new version of ``name`` (its number comes from ``record_versions``);
    ``columns`` are what the files said (digest, flavor, artifact_uri, status, ...)."""
    row: dict[str, Any] = {"model": name, "digest": "", "flavor": str(Flavor.NONE), "model_file": None,
                           "entry_script": None, "requirements": [], "sample": None, "expected": None,
                           "metrics": meta.metrics, "tags": meta.tags, "description": meta.description,
                           "source": str(meta.source), "external_ref": meta.external_ref, "artifact_uri": "",
                           "size_bytes": 0, "status": "ready", "created_at": now()}
    row.update(columns)
    return row


def reference_row(name: str, meta: RegisterMetadata) -> dict[str, Any]:
    """The row of a version whose files stay in the external registry (nothing to deploy here)."""
    return version_row(name, meta, artifact_uri=meta.external_ref or "", status="referenced")


def record_versions(conn: Connection, rows: list[dict[str, Any]], release: list[bool]) -> None:
    """Insert ``rows`` (``version_row``s) in their order inside the caller's write transaction:
    each gets the next number of its model (set in the row), and its ``model_version.registered``
    outbox event, which asks for a release when ``release[i]`` and the version is ready (else it
    is written already processed: there is nothing for the dispatcher to decide). A few
    statements for the whole list, however long."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    last = {m: int(v or 0) for m, v in conn.execute(_LAST_VERSIONS, {"names": names})}
    missing = [{"name": n, "description": "", "created_at": rows[0]["created_at"]} for n in names if n not in last]
    if missing:
        conn.execute(_INSERT_MODELS, missing)
    for r in rows:
        r["version"] = last[r["model"]] = last.get(r["model"], 0) + 1
    conn.execute(_INSERT_VERSIONS, rows)
    events = []
    for r, rel in zip(rows, release, strict=True):
        releasing = rel and r["status"] == "ready"
        events.append({"kind": REGISTERED, "created_at": r["created_at"], "processed_at": None if releasing
                       else r["created_at"], "error": None if releasing else NOT_RELEASED,
                       "payload": {"model": r["model"], "version": r["version"], "source": r["source"],
                                   "tags": r["tags"], "release": releasing}})
    conn.execute(_INSERT_OUTBOX, events)


def find_external_in(conn: Connection, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], ModelVersion]:
    """The versions already recorded for (model, source, external ref) ``keys``, by key: one query."""
    if not keys:
        return {}
    wanted = set(keys)
    rows = conn.execute(_EXTERNAL_IN, {"names": list({k[0] for k in keys}), "sources": list({k[1] for k in keys}),
                                       "refs": list({k[2] for k in keys})})
    found = {}
    for row in rows:
        key = (row.model, row.source, row.external_ref)
        if key in wanted:
            found[key] = version_from_row(row)
    return found


def release_later_in(conn: Connection, version: ModelVersion) -> bool:
    """``Registry.release_later`` inside the caller's write transaction."""
    if version.status != "ready":
        return False
    has_release = conn.execute(select(schema.releases.c.id).where(
        schema.releases.c.model == version.model, schema.releases.c.version == version.version)).first()
    pending = [r.payload for r in conn.execute(select(schema.outbox.c.payload).where(
        schema.outbox.c.processed_at.is_(None), schema.outbox.c.kind == REGISTERED))]
    if has_release or any(p.get("model") == version.model and p.get("version") == version.version
                          and p.get("release", True) for p in pending):
        return False
    conn.execute(_INSERT_OUTBOX.values(kind=REGISTERED, created_at=now(), payload={
        "model": version.model, "version": version.version, "source": str(version.source),
        "tags": version.tags, "release": True}))
    return True
