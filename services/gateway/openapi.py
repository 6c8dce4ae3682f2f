"""OpenAPI 3.1 documents from declarative route descriptions.

A route is an `Operation`: its parameters, body and replies, each body or
reply given as a Python type that msgspec describes (a wire model,
`list[Task]`...) or as a JSON Schema dict. `build_document` generates the
component schemas from the models once, so the document and the decoders
read the same definitions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from shared.models import ErrorResponse

Schema = dict[str, Any]
Shape = Any
"""A Python type msgspec can describe (a Struct, `list[Task]`, `int`...),
or a JSON Schema written out as a dict."""

REF_TEMPLATE = "#/components/schemas/{name}"

_ERROR_TEXT = {
    400: "A parameter or the body is invalid; `validationErrors` names it.",
    404: "The named task, workflow or definition does not exist.",
    409: "The resource exists already, or has already ended.",
    413: "The body, a payload in it, or a log line is over its size limit.",
    429: "The gateway holds as many polls as it allows; retry later.",
    "5XX": "A backend is unavailable (503, retryable) or the gateway failed.",
}


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter."""

    name: str
    schema: Schema
    description: str
    where: Literal["path", "query"] = "query"
    required: bool = False


@dataclass(frozen=True, slots=True)
class Body:
    """A request body: one shape per media type."""

    content: dict[str, Shape]
    description: str
    required: bool = True


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented answer; no media type means an empty body."""

    description: str
    media_type: str | None = None
    shape: Shape = None
    headers: dict[str, Schema] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: a method on a path, what it takes and what it answers.

    `errors` lists the 4xx statuses the route answers with an
    ErrorResponse; every route may also answer 5XX.
    """

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    replies: dict[int, Reply]
    params: tuple[Param, ...] = ()
    body: Body | None = None
    errors: tuple[int, ...] = ()
    description: str | None = None


def json_reply(description: str, shape: Shape) -> Reply:
    """A JSON answer of the given shape."""
    return Reply(description, "application/json", shape)


def text_reply(description: str) -> Reply:
    """A text/plain answer, as Conductor gives ids and counts."""
    return Reply(description, "text/plain", {"type": "string"})


def empty_reply(description: str) -> Reply:
    """An answer with no body."""
    return Reply(description)


def build_document(operations: Iterable[Operation], info: Schema) -> Schema:
    """Assemble the OpenAPI document of `operations`; `info` is its Info
    object (title, version, description)."""
    operations = list(operations)
    shapes = _shapes(operations)
    schemas, components = msgspec.json.schema_components(
        list(shapes.values()), ref_template=REF_TEMPLATE
    )
    resolved = dict(zip(shapes, schemas, strict=True))
    paths: dict[str, Schema] = {}
    for operation in operations:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(
            operation, resolved
        )
    return {
        "openapi": "3.1.0",
        "info": info,
        "tags": [{"name": tag} for tag in dict.fromkeys(o.tag for o in operations)],
        "paths": paths,
        "components": {"schemas": components},
    }


def _shape_key(shape: Shape) -> str:
    return repr(shape)


def _shapes(operations: list[Operation]) -> dict[str, Shape]:
    """Every Python type the operations mention, by a stable key."""
    found: dict[str, Shape] = {_shape_key(ErrorResponse): ErrorResponse}
    for shape in _mentioned(operations):
        if not isinstance(shape, dict):
            found.setdefault(_shape_key(shape), shape)
    return found


def _mentioned(operations: list[Operation]) -> Iterator[Shape]:
    for operation in operations:
        if operation.body is not None:
            yield from operation.body.content.values()
        for reply in operation.replies.values():
            if reply.shape is not None:
                yield reply.shape


def _schema(shape: Shape, resolved: dict[str, Schema]) -> Schema:
    if isinstance(shape, dict):
        return shape
    return resolved[_shape_key(shape)]


def _operation(operation: Operation, resolved: dict[str, Schema]) -> Schema:
    described: Schema = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": [operation.tag],
    }
    if operation.description:
        described["description"] = operation.description
    if operation.params:
        described["parameters"] = [_param(p) for p in operation.params]
    if operation.body is not None:
        described["requestBody"] = _body(operation.body, resolved)
    described["responses"] = _responses(operation, resolved)
    return described


def _param(param: Param) -> Schema:
    described: Schema = {
        "name": param.name,
        "in": param.where,
        "description": param.description,
        "required": param.required or param.where == "path",
        "schema": param.schema,
    }
    if param.schema.get("type") == "array":
        described["style"] = "form"
        described["explode"] = True
    return described


def _body(body: Body, resolved: dict[str, Schema]) -> Schema:
    return {
        "description": body.description,
        "required": body.required,
        "content": {
            media_type: {"schema": _schema(shape, resolved)}
            for media_type, shape in body.content.items()
        },
    }


def _responses(operation: Operation, resolved: dict[str, Schema]) -> Schema:
    responses: Schema = {
        str(status): _reply(reply, resolved)
        for status, reply in operation.replies.items()
    }
    error = {"schema": _schema(ErrorResponse, resolved)}
    for status in (*operation.errors, "5XX"):
        described: Schema = {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": error},
        }
        if status == 429:
            described["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before polling again.",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        responses[str(status)] = described
    return responses


def _reply(reply: Reply, resolved: dict[str, Schema]) -> Schema:
    described: Schema = {"description": reply.description}
    if reply.media_type is not None:
        described["content"] = {
            reply.media_type: {"schema": _schema(reply.shape, resolved)}
        }
    if reply.headers:
        described["headers"] = {
            name: {"schema": schema} for name, schema in reply.headers.items()
        }
    return described
