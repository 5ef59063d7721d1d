"""The served /openapi.json, made true.

The routes read their JSON themselves (so a malformed body is a precise 400, and streaming works), which
leaves FastAPI nothing to describe. This module describes each POST body with the schema *of the model
the route validates with* — the OpenAI routes' pydantic models (``model_json_schema``) and the native
``GenerateReqInput`` msgspec Struct (``msgspec.json.schema_components``) — so the document and the
validation have one definition and cannot drift. Every route also documents its error bodies (OpenAI's
``{"error": {...}}`` shape: 400 bad input, 401 without the API key, 413 over the body limit, 503 when
unhealthy), and the bearer-key scheme, from which ``/health`` is exempt.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_REF = "#/components/schemas/{}"

ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            },
        }
    },
}

_ERRORS = {
    "400": "bad input: the message names the field",
    "401": "missing or wrong API key (only when the server runs with --api-key)",
    "413": "the body is over --max-request-body-bytes",
    "503": "the server is starting, shutting down or unhealthy",
}


def _pydantic_schema(model: Any, components: dict) -> dict:
    schema = model.model_json_schema(ref_template=_REF.replace("{}", "{model}"))
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": _REF.format(model.__name__)}


def _msgspec_schema(struct: Any, components: dict) -> dict:
    (schema,), defs = msgspec.json.schema_components([struct], ref_template=_REF.replace("{}", "{name}"))
    components.update(defs)
    return schema


def install(app: FastAPI, bodies: dict[str, Any], open_paths: tuple[str, ...] = ("/health",)) -> None:
    """Replace ``app.openapi`` with one that documents ``bodies`` (path → pydantic model class or
    msgspec Struct; a list of them for a route that accepts several) and the error responses."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
        comps = doc.setdefault("components", {})
        schemas = comps.setdefault("schemas", {})
        schemas["ErrorResponse"] = ERROR_SCHEMA
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                               "description": "the --api-key value, when the server has one"}}
        doc["security"] = [{"bearer": []}]
        for path, ops in doc.get("paths", {}).items():
            for method, op in ops.items():
                if path in open_paths:
                    op["security"] = []  # open even with --api-key: load balancers probe it
                model = bodies.get(path) if method == "post" else None
                if model is not None:
                    models = model if isinstance(model, list) else [model]
                    parts = [_pydantic_schema(m, schemas) if hasattr(m, "model_json_schema")
                             else _msgspec_schema(m, schemas) for m in models]
                    op["requestBody"] = {"required": True, "content": {"application/json": {
                        "schema": parts[0] if len(parts) == 1 else {"anyOf": parts}}}}
                responses = op.setdefault("responses", {})
                for code, why in _ERRORS.items():
                    if code in ("400", "413") and method != "post":
                        continue
                    if code == "401" and path in open_paths:
                        continue
                    responses.setdefault(code, {"description": why})
                    responses[code]["content"] = {"application/json": {"schema": {"$ref": _REF.format("ErrorResponse")}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
