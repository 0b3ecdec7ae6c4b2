"""The registry's building blocks: name checks, safe archives and tree digests, metadata
detection (flavor, requirements, samples) and artifact stores. The database side lives in
``registry.service``; the S3 store in ``registry.s3`` (imported only when used)."""

from modelcd.registry.archive import ExtractResult, pack_tree, safe_extract, tree_digest, write_tree_archive
from modelcd.registry.artifacts import ArtifactStore, LocalArtifactStore, get_artifact_store
from modelcd.registry.flavors import DetectedFlavor, detect_flavor
from modelcd.registry.names import (
    validate_description,
    validate_environment_name,
    validate_model_name,
    validate_tags,
)
from modelcd.registry.requirements import load_requirements, read_requirements
from modelcd.registry.samples import parse_expected, parse_sample

__all__ = [
    "ArtifactStore",
    "DetectedFlavor",
    "ExtractResult",
    "LocalArtifactStore",
    "detect_flavor",
    "get_artifact_store",
    "load_requirements",
    "pack_tree",
    "parse_expected",
    "parse_sample",
    "read_requirements",
    "safe_extract",
    "tree_digest",
    "validate_description",
    "validate_environment_name",
    "validate_model_name",
    "validate_tags",
    "write_tree_archive",
]
