"""Settings: embedded defaults, then an optional YAML file (``MODELCD_CONFIG``), then
``MODELCD_*`` environment variables, then explicit overrides (CLI flags). Invalid settings
fail at start with the setting's name and the fix."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelcd.errors import ConfigError

ENV_PREFIX = "MODELCD_"


class Settings(BaseModel):
    """Everything the control plane can be told. Field names are the YAML keys; the
    environment variable of a field is ``MODELCD_`` + its upper-cased name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(Path(".modelcd"), description="data folder: database, artifacts, bundles, logs")
    url: str = Field("http://127.0.0.1:8600", description="where the CLI finds the service")
    token: str | None = Field(None, repr=False, description="API token; generated into $MODELCD_HOME/token when unset")
    host: str = "127.0.0.1"
    port: int = Field(8600, ge=1, le=65535)
    open_reads: Literal["auto", "true", "false"] = Field(
        "auto", description="whether API reads (and /metrics) need no token: auto = open while the API listens on "
        "loopback only, closed (a viewer token or better) otherwise")
    router_host: str = "127.0.0.1"
    router_port: int = Field(8700, ge=1, le=65535)
    router_allow_open_endpoints: bool = Field(False, description="a router on a non-loopback host serves endpoints "
                                              "without a key (auth none) too; otherwise they answer 403")
    router_mirror_worker_priority: Literal["idle", "low", "normal"] = Field(
        "idle", description="CPU priority of the router's mirror worker (shadow copies, sampled traffic): idle = "
        "only CPU time serving does not want (copies it has no time for are dropped and counted), low = nice 5, "
        "normal = the router's")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite in home")
    artifact_store: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_prefix: str = "modelcd"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    max_artifact_bytes: int = Field(2 * 1024**3, gt=0)
    http_header_timeout_s: float = Field(10.0, gt=0, description="API port: a connection that has not sent a "
                                         "request's complete headers within this is answered 408 and closed")
    runner_workers: int = Field(2, ge=1, le=64)
    health_timeout_s: float = Field(60.0, gt=0)
    scoring_workers: int = Field(2, ge=1, le=64)
    warm_starts: bool = Field(True, description="process target: fork new deployments from a parent process per "
                              "environment that has imported its modules (false: a fresh interpreter each)")
    python: str | None = Field(None, description="interpreter for scoring bundles; default: this one")
    # webhook intake (POST /hooks/{source}); a source without its secret refuses every delivery
    hooks_mlflow_secret: str | None = Field(None, repr=False, description="HMAC secret of the MLflow webhook")
    hooks_generic_secret: str | None = Field(None, repr=False, description="HMAC-SHA256 secret for /hooks/generic")
    hooks_s3_token: str | None = Field(None, repr=False, description="auth token MinIO sends (Bearer)")
    hooks_azureml_secret: str | None = Field(None, repr=False, description="secret in ?code= or X-Modelcd-Secret")
    # notifications (a production watch's breach): signed like /hooks/generic (X-Modelcd-Signature)
    notify_urls: list[str] = Field(default_factory=list, description="URLs a breach notification is POSTed to "
                                   "(comma-separated in MODELCD_NOTIFY_URLS)")
    notify_secret: str | None = Field(None, repr=False, description="HMAC-SHA256 secret that signs notifications")
    # Azure ML versions are fetched with a service principal (AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET)
    azureml_management_url: str = Field("https://management.azure.com", description="Azure Resource Manager: "
                                        "model versions and datastores are read there")
    azureml_login_url: str = Field("https://login.microsoftonline.com", description="Microsoft identity platform "
                                   "that issues the service principal's tokens")
    azureml_api_version: str = Field("2025-09-01", description="api-version of the Azure ML REST calls")
    azureml_storage_credential: Literal["datastore", "account_key"] = Field(
        "datastore", description="datastore: the key or SAS Azure ML keeps for the datastore (listSecrets); "
        "account_key: the key in AZURE_STORAGE_KEY")
    azureml_blob_url: str | None = Field(None, description="blob service URL, {account} replaced by the datastore's "
                                         "account; default {protocol}://{account}.blob.{endpoint}")
    hooks_sagemaker_api_key: str | None = Field(None, repr=False, description="EventBridge API destination key")
    hooks_sagemaker_api_key_header: str = "x-modelcd-api-key"
    hooks_sns_topic_arns: list[str] = Field(default_factory=list, description="SNS topics accepted")
    hooks_sns_cert_dir: Path | None = Field(None, description="trusted SNS signing certificates (PEM), offline")
    hooks_replay_window_s: float = Field(300.0, gt=0, description="oldest accepted signed timestamp")
    hooks_max_body_bytes: int = Field(1024 * 1024, gt=0)
    hooks_max_attempts: int = Field(6, ge=1, le=100, description="tries before a delivery goes to the dead letter")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow server that models:/ URIs are fetched from")
    mlflow_poll_interval_s: float = Field(0.0, ge=0, description="poll MLflow for new versions (0: off; webhooks)")
    # what a release's end writes back (releases.observers): MLflow aliases and tags, GitHub deployments
    mlflow_writeback: bool = Field(True, description="a release of an MLflow version sets the environment's alias "
                                   "and the version's modelcd.* tags in MLflow when it ends")
    mlflow_alias_prefix: str = Field("", pattern=r"^[A-Za-z0-9_-]{0,64}$", description="MLflow alias of an "
                                     "environment = this + the environment's name (e.g. production)")
    github_deployments: bool = Field(False, description="a release run by GitHub Actions shows as a GitHub "
                                     "deployment of its environment (the token needs Deployments: write)")
    s3_poll_bucket: str | None = Field(None, description="bucket to poll for models/<name>/<version>/<marker>")
    s3_poll_interval_s: float = Field(0.0, ge=0, description="poll that bucket (0: off; bucket notifications)")
    # docker target and scoring images
    docker_host: str | None = Field(None, description="engine URL (unix://, tcp://, ssh://); default $DOCKER_HOST "
                                    "or the local socket")
    docker_base_image: str = Field("python:3.11-slim", description="FROM of scoring images (needs python3 + venv); "
                                   "`modelcd base-image build` makes one offline")
    docker_repository: str = Field("modelcd", description="images are tagged {repository}/{model}:{version}-{digest12}")
    docker_network: Literal["bridge", "host"] = Field("bridge", description="bridge publishes the scoring port; "
                                                      "host shares the engine host's network")
    docker_bridge_network: str = Field("bridge", description="the bridge-driver network `network: bridge` "
                                       "containers join (docker's default `bridge`, or one made with "
                                       "`docker network create`)")
    docker_publish_host: str = Field("127.0.0.1", description="host address a bridge container's port is published on")
    docker_url_host: str = Field("127.0.0.1", description="address the router and smoke tests reach containers at")
    docker_registry: str | None = Field(None, description="push images to this registry (host[:port]); none: no push")
    docker_registry_username: str | None = None
    docker_registry_password: str | None = Field(None, repr=False, description="registry password or token")
    docker_build_timeout_s: float = Field(1800.0, gt=0, description="longest an image build may take")
    docker_dependencies: Literal["auto", "host", "engine", "pip"] = Field(
        "auto", description="how an image's virtualenv is made: on the host when it has the image's Python (host), "
        "inside the engine with uv (engine) or pip (pip); auto: host when it can, else engine")

    @field_validator("hooks_sns_topic_arns", "notify_urls", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("notify_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not v.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"each must start with http:// or https:// (got {bad[0][:80]!r})")
        return value

    @field_validator("url", "s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _poller_needs_uri(self) -> Settings:
        if self.mlflow_poll_interval_s > 0 and not self.mlflow_tracking_uri:
            raise ValueError("mlflow_poll_interval_s needs mlflow_tracking_uri: set MODELCD_MLFLOW_TRACKING_URI "
                             "to the MLflow server's URL")
        if self.s3_poll_interval_s > 0 and not self.s3_poll_bucket:
            raise ValueError("s3_poll_interval_s needs s3_poll_bucket: set MODELCD_S3_POLL_BUCKET to the bucket "
                             "holding models/<name>/<version>/")
        return self

    @property
    def reads_open(self) -> bool:
        """Whether API reads need no token (``open_reads``; auto: while ``host`` is loopback)."""
        if self.open_reads == "auto":
            return is_loopback(self.host)
        return self.open_reads == "true"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home.resolve() / 'modelcd.db'}"

    @property
    def router_url(self) -> str:
        return f"http://{self.router_host}:{self.router_port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost`` (a name or wildcard is not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _from_env(environ: dict[str, str]) -> dict[str, str]:
    known = Settings.model_fields
    out: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key != "MODELCD_CONFIG":
            name = key[len(ENV_PREFIX):].lower()
            if name in known:
                out[name] = value
    return out


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"MODELCD_CONFIG: cannot read {path}: {e.strerror}; point it at a YAML file",
                          field="MODELCD_CONFIG") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"MODELCD_CONFIG: {path} is not valid YAML: {e}", field="MODELCD_CONFIG") from e
    if not isinstance(data, dict):
        raise ConfigError(f"MODELCD_CONFIG: {path} must hold a mapping of setting: value",
                          field="MODELCD_CONFIG")
    return data


HOME_SETTINGS = "settings.yaml"


def save_home_settings(home: Path, updates: dict[str, Any]) -> Path:
    """Merge ``updates`` into ``$MODELCD_HOME/settings.yaml`` (mode 0600: it may hold secrets)."""
    path = home / HOME_SETTINGS
    current = _from_file(path) if path.is_file() else {}
    current.update(updates)
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(current, f, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_settings(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Merge defaults, YAML file, environment and overrides; raise ConfigError naming the
    first bad setting (as its environment variable) and what it accepts."""
    env = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    home = Path(str((overrides or {}).get("home") or env.get("MODELCD_HOME") or Settings.model_fields["home"].default))
    saved = home / HOME_SETTINGS
    if saved.is_file():  # written by commands such as `modelcd sources connect`; lowest precedence
        for k, v in _from_file(saved).items():
            values[k], sources[k] = v, f"{k} in {saved}"
    if env.get("MODELCD_CONFIG"):
        for k, v in _from_file(Path(env["MODELCD_CONFIG"])).items():
            values[k], sources[k] = v, f"{k} in {env['MODELCD_CONFIG']}"
    for k, v in _from_env(env).items():
        values[k], sources[k] = v, ENV_PREFIX + k.upper()
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k], sources[k] = v, f"--{k.replace('_', '-')}"
    try:
        return Settings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a rule across settings: its message names them
            raise ConfigError(f"settings: {str(err['msg']).removeprefix('Value error, ')}") from None
        name = str(err["loc"][0])
        where = sources.get(name, ENV_PREFIX + name.upper())
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(Settings.model_fields))
            raise ConfigError(f"{where}: unknown setting {name!r}; known settings: {known}", field=name) from None
        raise ConfigError(f"{where}: {err['msg']} (got {err.get('input')!r})", field=name) from None
