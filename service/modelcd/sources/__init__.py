"""Webhook sources: one adapter per external registry (MLflow, Azure ML via Event Grid,
SageMaker via EventBridge/SNS, MinIO/S3 bucket notifications, and a generic signed hook).
Each verifies authenticity, names the delivery and normalises it to typed events; see
``sources.base`` for the contract."""

from modelcd.sources.base import (
    KNOWN_SOURCES,
    Accepted,
    Event,
    HookRequest,
    Ignored,
    Registered,
    Respond,
    Source,
    get_source,
)

__all__ = ["KNOWN_SOURCES", "Accepted", "Event", "HookRequest", "Ignored", "Registered", "Respond", "Source",
           "get_source"]
