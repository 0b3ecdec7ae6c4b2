"""Typed values at the core: frozen dataclasses and StrEnums shared by registry, releases,
stages, targets and the API. No Flask, no Docker, no HTTP here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Flavor(StrEnum):
    SKLEARN = "sklearn"  # a pickle/joblib file with .predict()
    ONNX = "onnx"  # an .onnx graph run with onnxruntime
    CUSTOM = "custom"  # an entry script with init() / run(raw_data), as in Azure ML
    PYFUNC = "pyfunc"  # an MLflow model (MLmodel) served by mlflow.pyfunc in its own environment
    NONE = "none"  # referenced only: the files stay in the external registry


class Source(StrEnum):
    NATIVE = "native"
    MLFLOW = "mlflow"
    AZUREML = "azureml"
    SAGEMAKER = "sagemaker"
    S3 = "s3"


@dataclass(frozen=True)
class ModelVersion:
    """An immutable, numbered artifact of a model."""

    model: str
    version: int
    digest: str  # sha256 of the file tree (see registry.archive.tree_digest)
    flavor: Flavor
    model_file: str | None  # path inside the files of the model file (sklearn/onnx) or MLmodel (pyfunc)
    entry_script: str | None  # path inside the files of the entry script (custom)
    requirements: tuple[str, ...]
    sample: Any | None  # request body used by smoke tests and swagger (e.g. {"data": [[...]]})
    expected: Any | None  # expected response "predictions" for the sample, if known
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    source: Source = Source.NATIVE
    external_ref: str | None = None
    artifact_uri: str = ""  # where the ArtifactStore keeps the files
    size_bytes: int = 0
    status: str = "ready"  # ready | referenced (files stay in the external registry; nothing to deploy)
    created_at: str = ""

    @property
    def digest12(self) -> str:
        return self.digest[:12]


class JobType(StrEnum):
    IMPORT = "import"
    BUILD = "build"
    DEPLOY = "deploy"
    SMOKE = "smoke"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    RETIRE = "retire"  # an endpoint drained and its deployments stopped (releases.retirement)
    ARCHIVE = "archive"  # a model's new releases stopped
    UNARCHIVE = "unarchive"
    STATISTICS = "statistics"  # training-data statistics of a version (jobs.statistics)
    BATCH_PREDICTION = "batch_prediction"  # a run of a batch deployment (batch.scheduler)
    EVALUATE = "evaluate"  # a version scored on labelled data, its metrics stored (jobs.evaluation)
    PRUNE_IMAGES = "prune_images"  # scoring images nothing needs removed from the engine (jobs.images)


class JobState(StrEnum):
    CREATED = "created"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class DeploymentState(StrEnum):
    STARTING = "starting"  # target.create() under way
    READY = "ready"  # healthy, no traffic yet (being smoke-tested)
    SERVING = "serving"  # holds traffic on its endpoint
    STANDBY = "standby"  # kept warm for instant rollback, no traffic
    STOPPED = "stopped"  # retired or cleaned up
    FAILED = "failed"

    @property
    def live(self) -> bool:
        return self in (DeploymentState.READY, DeploymentState.SERVING, DeploymentState.STANDBY)


@dataclass(frozen=True)
class Deployment:
    """One running scoring service of one model version on one target."""

    id: str
    model: str
    version: int
    environment: str
    target: str
    state: DeploymentState
    url: str | None
    pid: int | None
    port: int | None
    bundle: str | None
    release_id: str | None
    created_at: str = ""
    # everything the target needs to start it again, fixed when the record is made
    # (``releases.deployments.spec_values``): bundle, workers, env, resources, network
    spec: dict[str, Any] = field(default_factory=dict)
    # scaled to zero (``releases.idle``): ``{since, wake_timeout_s}``; its process is stopped, its route held
    sleeping: dict[str, Any] | None = None


@dataclass(frozen=True)
class Bundle:
    """What the build stage made: a bundle folder (the build context) and, for the docker target, an image."""

    path: Path  # bundle folder: model/, runtime/, scoring.json
    python: Path  # interpreter of the bundle's virtualenv
    env_key: str  # hash of the requirements: venvs are shared by it
    reused_env: bool  # True when the venv came from the cache
    image: str | None = None  # docker target: the scoring image's reference ({repository}/{model}:{tag})
    image_id: str | None = None  # docker target: its content id (sha256:...), what containers are checked against
    image_digest: str | None = None  # docker target, pushed: the registry's manifest digest (sha256:...)
