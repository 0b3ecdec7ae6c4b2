"""The ``/swagger.json`` document, generated from the version's input sample and expected output.

Like Azure ML's scoring server it answers Swagger 2.0 by default and OpenAPI 3 for
``?version=3``. JSON schema types are inferred from the sample values.
"""

from __future__ import annotations

from typing import Any

from .config import ScoringConfig

_GENERIC_INPUT: dict[str, Any] = {
    "type": "object",
    "description": (
        "Exactly one of: data (rows, records or columns), dataframe_split, dataframe_records, "
        "instances, inputs; plus an optional params object that is ignored."
    ),
}
_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "stable error code"},
        "message": {"type": "string"},
        "exception": {"type": "string", "description": "exception type (500 only)"},
    },
}
_HEALTH: dict[str, Any] = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "model": {"type": "string"}, "version": {}},
}


def infer_schema(value: Any) -> dict[str, Any]:
    """A JSON schema describing ``value``: objects, arrays (items merged), and scalar types."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer", "format": "int64"}
    if isinstance(value, float):
        return {"type": "number", "format": "double"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        items: dict[str, Any] | None = None
        for element in value:
            schema = infer_schema(element)
            items = schema if items is None else merge_schemas(items, schema)
        return {"type": "array", "items": items or {}}
    if isinstance(value, dict):
        return {
            "type": "object",
            "required": list(value),
            "properties": {str(k): infer_schema(v) for k, v in value.items()},
        }
    return {}


def merge_schemas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The narrowest schema both ``a`` and ``b`` satisfy (integer and number merge to number)."""
    if a == b:
        return a
    types = {a.get("type"), b.get("type")}
    if types == {"integer", "number"}:
        return {"type": "number", "format": "double"}
    if types == {"array"}:
        return {"type": "array", "items": merge_schemas(a.get("items", {}), b.get("items", {}))}
    if types == {"object"}:
        props_a, props_b = a.get("properties", {}), b.get("properties", {})
        merged = {k: merge_schemas(props_a[k], props_b[k]) if k in props_b else props_a[k] for k in props_a}
        merged.update({k: v for k, v in props_b.items() if k not in merged})
        required = [k for k in a.get("required", []) if k in b.get("required", [])]
        return {"type": "object", "required": required, "properties": merged}
    return {}


def response_example(config: ScoringConfig) -> Any:
    """What ``POST /score`` answers for the sample: the envelope for built-in flavors, ``run()``'s value else."""
    if config.expected is None:
        return None
    if config.flavor == "custom":
        return config.expected
    return {"predictions": config.expected}


def build_document(config: ScoringConfig, version: int = 2, auth: bool = False) -> dict[str, Any]:
    """The Swagger 2.0 (``version=2``) or OpenAPI 3.0 (``version=3``) document of this service."""
    request = (
        _with_example(infer_schema(config.sample), config.sample) if config.sample is not None else dict(_GENERIC_INPUT)
    )
    output = response_example(config)
    response = _with_example(infer_schema(output), output) if output is not None else {"type": "object"}
    title = f"{config.model} (version {config.version})"
    description = f"Scoring service of model {config.model!r} version {config.version} ({config.flavor})."
    if version == 3:
        return _openapi3(title, description, request, response, auth)
    return _swagger2(title, description, request, response, auth)


def _with_example(schema: dict[str, Any], example: Any) -> dict[str, Any]:
    """``schema`` with an ``example`` attached."""
    return {**schema, "example": example}


def _score_responses(ref: str, wrap: Any) -> dict[str, Any]:
    """The responses of ``POST /score``; ``wrap`` builds one response object from a schema ref."""
    return {
        "200": wrap("Predictions", f"{ref}ScoringOutput"),
        "400": wrap("Bad input: not JSON, wrong keys, wrong shape or non-numeric values", f"{ref}Error"),
        "401": wrap("Missing or wrong bearer key", f"{ref}Error"),
        "415": wrap("Content-Type is not application/json", f"{ref}Error"),
        "500": wrap("The model raised an exception", f"{ref}Error"),
    }


def _swagger2(title: str, description: str, request: Any, response: Any, auth: bool) -> dict[str, Any]:
    """Swagger 2.0, the default of Azure ML's ``/swagger.json``."""

    def wrap(text: str, ref: str) -> dict[str, Any]:
        return {"description": text, "schema": {"$ref": ref}}

    post: dict[str, Any] = {
        "operationId": "score",
        "description": "Score a batch of inputs.",
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "parameters": [
            {"name": "body", "in": "body", "required": True, "schema": {"$ref": "#/definitions/ScoringInput"}}
        ],
        "responses": _score_responses("#/definitions/", wrap),
    }
    doc: dict[str, Any] = {
        "swagger": "2.0",
        "info": {"title": title, "description": description, "version": "1.0"},
        "schemes": ["http"],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "paths": {
            "/score": {"post": post},
            "/healthz": {
                "get": {"operationId": "health", "responses": {"200": wrap("Model loaded", "#/definitions/Health")}}
            },
        },
        "definitions": {"ScoringInput": request, "ScoringOutput": response, "Error": _ERROR, "Health": _HEALTH},
    }
    if auth:
        doc["securityDefinitions"] = {
            "Bearer": {"type": "apiKey", "name": "Authorization", "in": "header", "description": "Bearer <key>"}
        }
        post["security"] = [{"Bearer": []}]
    return doc


def _openapi3(title: str, description: str, request: Any, response: Any, auth: bool) -> dict[str, Any]:
    """OpenAPI 3.0.3, served for ``/swagger.json?version=3``."""

    def wrap(text: str, ref: str) -> dict[str, Any]:
        return {"description": text, "content": {"application/json": {"schema": {"$ref": ref}}}}

    post: dict[str, Any] = {
        "operationId": "score",
        "description": "Score a batch of inputs.",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoringInput"}}},
        },
        "responses": _score_responses("#/components/schemas/", wrap),
    }
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": title, "description": description, "version": "1.0"},
        "paths": {
            "/score": {"post": post},
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "responses": {"200": wrap("Model loaded", "#/components/schemas/Health")},
                }
            },
        },
        "components": {
            "schemas": {"ScoringInput": request, "ScoringOutput": response, "Error": _ERROR, "Health": _HEALTH}
        },
    }
    if auth:
        doc["components"]["securitySchemes"] = {"Bearer": {"type": "http", "scheme": "bearer"}}
        post["security"] = [{"Bearer": []}]
    return doc
