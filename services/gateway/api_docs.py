"""`GET /api-docs`: the OpenAPI description of every route the gateway serves.

Each route is described here once, next to the others, as data; the
document is built from the running settings, so the limits it states are
the ones this gateway enforces. A test compares these descriptions with
the application's router, so a route added without one fails it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from services.gateway.openapi import (
    Body,
    Operation,
    Param,
    Schema,
    build_document,
    empty_reply,
    json_reply,
    text_reply,
)
from shared.config import Settings
from shared.models import (
    BulkResponse,
    PollData,
    ResultStatus,
    StartWorkflowRequest,
    Task,
    TaskDef,
    TaskExecLog,
    TaskResult,
    Workflow,
    WorkflowDef,
)
from shared.queues import NAME_PATTERN

DOCS_PATH = "/api-docs"
DOCUMENT = web.AppKey("api_docs", bytes)

_STRING: Schema = {"type": "string", "minLength": 1}
_NAME: Schema = {"type": "string", "pattern": NAME_PATTERN}
_OBJECT: Schema = {"type": "object"}
_COUNTS: Schema = {"type": "object", "additionalProperties": {"type": "integer"}}
_VERBOSE_COUNTS: Schema = {
    "type": "object",
    "additionalProperties": {
        "type": "object",
        "additionalProperties": {
            "type": "object",
            "properties": {
                "size": {"type": "integer"},
                "uacked": {"type": "integer"},
            },
            "required": ["size", "uacked"],
        },
    },
}

_WORKER = Param("workerid", {"type": "string"}, "The polling worker's id.")
_DOMAIN = Param("domain", _NAME, "A domain: read the queue `domain:taskType`.")
_TASK_ID = Param("taskId", _STRING, "A task id.", "path")
_WORKFLOW_ID = Param("workflowId", _STRING, "A workflow id.", "path")
_VERSION = Param(
    "version",
    {"type": "integer", "minimum": 0, "default": 0},
    "A definition version; 0 or absent means the latest.",
)


def _task_type(where: Any = "path", *, required: bool = True) -> Param:
    return Param(
        "taskType",
        _NAME,
        "A task type: letters, digits, '_', '-' and '.', 1 to 200 characters.",
        where,
        required,
    )


def _json_body(shape: Any, description: str, *, required: bool = True) -> Body:
    return Body({"application/json": shape}, description, required)


def describe(settings: Settings) -> list[Operation]:
    """Every route of the gateway, with the limits of `settings`."""
    return [
        *_poll_operations(settings),
        *_update_operations(),
        *_queue_operations(),
        *_log_operations(),
        *_task_def_operations(),
        *_workflow_def_operations(),
        *_workflow_operations(),
        *_operational_operations(),
    ]


def _poll_operations(settings: Settings) -> list[Operation]:
    count = Param(
        "count",
        {
            "type": "integer",
            "minimum": 0,
            "maximum": settings.max_poll_count,
            "default": 1,
        },
        "How many tasks to take at most.",
    )
    timeout = Param(
        "timeout",
        {
            "type": "integer",
            "minimum": 0,
            "maximum": settings.max_poll_timeout_ms,
            "default": 100,
        },
        "How long to wait for a first task, in milliseconds.",
    )
    return [
        Operation(
            "GET",
            "/api/tasks/poll/batch/{taskType}",
            "batchPoll",
            "Take up to `count` tasks, waiting up to `timeout` ms",
            "tasks",
            {200: json_reply("The tasks taken, possibly none.", list[Task])},
            (_task_type(), _WORKER, _DOMAIN, count, timeout),
            errors=(400, 429),
        ),
        Operation(
            "GET",
            "/api/tasks/poll/{taskType}",
            "poll",
            "Take one task, waiting up to 100 ms",
            "tasks",
            {
                200: json_reply("The task taken.", Task),
                204: empty_reply("No task was ready."),
            },
            (_task_type(), _WORKER, _DOMAIN),
            errors=(400, 429),
        ),
    ]


def _update_operations() -> list[Operation]:
    result = _json_body(TaskResult, "A worker's result for a task.")
    return [
        Operation(
            "POST",
            "/api/tasks",
            "updateTask",
            "Report a task's result",
            "tasks",
            {200: text_reply("The task id.")},
            body=result,
            errors=(400, 404, 413),
        ),
        Operation(
            "POST",
            "/api/tasks/update-v2",
            "updateTaskV2",
            "Report a task's result and take the next task of its type",
            "tasks",
            {
                200: json_reply("The next task of the same type and domain.", Task),
                204: empty_reply("The task is not over, or no task was ready."),
            },
            body=result,
            errors=(400, 404, 413),
        ),
        Operation(
            "POST",
            "/api/tasks/{workflowId}/{taskRefName}/{status}",
            "updateTaskByRefName",
            "Report the result of a workflow's pending task by reference name",
            "tasks",
            {200: text_reply("The task id; empty when no such task is pending.")},
            (
                _WORKFLOW_ID,
                Param("taskRefName", _STRING, "The task's reference name.", "path"),
                Param(
                    "status",
                    msgspec.json.schema(ResultStatus),
                    "The task's new status.",
                    "path",
                ),
                _WORKER,
            ),
            _json_body(_OBJECT, "The task's output."),
            errors=(400, 404, 413),
        ),
        Operation(
            "POST",
            "/api/tasks/{taskId}/ack",
            "ackTask",
            "Acknowledge that a worker holds a task (Conductor 2.x)",
            "tasks",
            {200: text_reply("`true` if the worker holds the task, else `false`.")},
            (_TASK_ID, _WORKER),
        ),
    ]


def _queue_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/api/tasks/queue/sizes",
            "queueSizes",
            "Count the ready tasks of several task types",
            "queues",
            {200: json_reply("Ready tasks by task type.", _COUNTS)},
            (
                Param(
                    "taskType",
                    {"type": "array", "items": _NAME, "minItems": 1},
                    "A task type; repeat the parameter for several.",
                    required=True,
                ),
            ),
            errors=(400,),
        ),
        Operation(
            "GET",
            "/api/tasks/queue/size",
            "queueSize",
            "Count the ready tasks of a task type in a domain",
            "queues",
            {200: json_reply("Ready tasks.", {"type": "integer"})},
            (_task_type("query"), _DOMAIN),
            errors=(400,),
        ),
        Operation(
            "GET",
            "/api/tasks/queue/all",
            "allQueues",
            "Count the ready tasks of every queue",
            "queues",
            {200: json_reply("Ready tasks by queue name.", _COUNTS)},
        ),
        Operation(
            "GET",
            "/api/tasks/queue/all/verbose",
            "allQueuesVerbose",
            "Count the ready and unacknowledged tasks of every queue",
            "queues",
            {200: json_reply("Counts by queue name and shard.", _VERBOSE_COUNTS)},
        ),
        Operation(
            "GET",
            "/api/tasks/queue/polldata",
            "pollData",
            "When a task type was last polled, per domain",
            "queues",
            {200: json_reply("One entry per domain.", list[PollData])},
            (_task_type("query"),),
            errors=(400,),
        ),
        Operation(
            "GET",
            "/api/tasks/queue/polldata/all",
            "allPollData",
            "When every task type was last polled, per domain",
            "queues",
            {200: json_reply("One entry per task type and domain.", list[PollData])},
        ),
        Operation(
            "POST",
            "/api/tasks/queue/requeue/{taskType}",
            "requeue",
            "Publish every scheduled task of a type again",
            "queues",
            {200: text_reply("How many tasks were published.")},
            (_task_type(),),
            errors=(400,),
        ),
    ]


def _log_operations() -> list[Operation]:
    line = {"type": "string"}
    return [
        Operation(
            "GET",
            "/api/tasks/{taskId}",
            "getTask",
            "Read a task",
            "tasks",
            {200: json_reply("The task.", Task)},
            (_TASK_ID,),
            errors=(404,),
        ),
        Operation(
            "POST",
            "/api/tasks/{taskId}/log",
            "addLog",
            "Append a log line to a task",
            "tasks",
            {200: empty_reply("The line is appended.")},
            (_TASK_ID,),
            Body(
                {"text/plain": line, "application/json": line},
                "The line: the whole text body, or a JSON string.",
                required=False,
            ),
            errors=(400, 404, 413),
            description=(
                "A task keeps its newest lines; past the per-task count the "
                "oldest are dropped."
            ),
        ),
        Operation(
            "GET",
            "/api/tasks/{taskId}/log",
            "getLogs",
            "Read a task's log lines",
            "tasks",
            {
                200: json_reply("The lines, oldest first.", list[TaskExecLog]),
                204: empty_reply("The task has no log lines."),
            },
            (_TASK_ID,),
        ),
    ]


def _task_def_operations() -> list[Operation]:
    name = _task_type()
    return [
        Operation(
            "POST",
            "/api/metadata/taskdefs",
            "registerTaskDefs",
            "Create or replace task definitions",
            "metadata",
            {200: empty_reply("The definitions are stored.")},
            body=_json_body(
                Annotated[list[TaskDef], Meta(min_length=1)],
                "One or more task definitions.",
            ),
            errors=(400, 413),
        ),
        Operation(
            "PUT",
            "/api/metadata/taskdefs",
            "updateTaskDef",
            "Replace an existing task definition",
            "metadata",
            {200: empty_reply("The definition is stored.")},
            body=_json_body(TaskDef, "The task definition."),
            errors=(400, 404, 413),
        ),
        Operation(
            "GET",
            "/api/metadata/taskdefs",
            "listTaskDefs",
            "List task definitions",
            "metadata",
            {200: json_reply("Every task definition.", list[TaskDef])},
        ),
        Operation(
            "GET",
            "/api/metadata/taskdefs/{taskType}",
            "getTaskDef",
            "Read a task definition",
            "metadata",
            {200: json_reply("The task definition.", TaskDef)},
            (Param("taskType", _STRING, name.description, "path"),),
            errors=(404,),
        ),
        Operation(
            "DELETE",
            "/api/metadata/taskdefs/{taskType}",
            "deleteTaskDef",
            "Delete a task definition",
            "metadata",
            {200: empty_reply("The definition is deleted.")},
            (Param("taskType", _STRING, name.description, "path"),),
            errors=(404,),
        ),
    ]


def _workflow_def_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/api/metadata/workflow",
            "registerWorkflowDef",
            "Create a workflow definition",
            "metadata",
            {200: empty_reply("The definition is stored.")},
            (
                Param(
                    "overwrite",
                    {"type": "boolean", "default": False},
                    "Replace the same name and version if it exists.",
                ),
            ),
            _json_body(WorkflowDef, "The workflow definition."),
            errors=(400, 409, 413),
        ),
        Operation(
            "PUT",
            "/api/metadata/workflow",
            "updateWorkflowDefs",
            "Create or replace workflow definitions",
            "metadata",
            {200: json_reply("Which definitions were stored.", BulkResponse)},
            body=_json_body(list[WorkflowDef], "Workflow definitions."),
            errors=(400, 413),
        ),
        Operation(
            "GET",
            "/api/metadata/workflow",
            "listWorkflowDefs",
            "List workflow definitions",
            "metadata",
            {200: json_reply("Every version of every definition.", list[WorkflowDef])},
        ),
        Operation(
            "GET",
            "/api/metadata/workflow/{name}",
            "getWorkflowDef",
            "Read a workflow definition",
            "metadata",
            {200: json_reply("The workflow definition.", WorkflowDef)},
            (Param("name", _STRING, "The workflow's name.", "path"), _VERSION),
            errors=(400, 404),
        ),
    ]


def _workflow_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/api/workflow",
            "startWorkflow",
            "Start a workflow",
            "workflows",
            {200: text_reply("The workflow id.")},
            body=_json_body(StartWorkflowRequest, "What to start, and its input."),
            errors=(400, 404, 413),
        ),
        Operation(
            "POST",
            "/api/workflow/{name}",
            "startWorkflowByName",
            "Start a workflow by name",
            "workflows",
            {200: text_reply("The workflow id.")},
            (
                Param("name", _STRING, "The workflow's name.", "path"),
                _VERSION,
                Param("correlationId", {"type": "string"}, "A correlation id."),
                Param(
                    "priority",
                    {"type": "integer", "minimum": 0, "maximum": 99, "default": 0},
                    "The workflow's priority.",
                ),
            ),
            _json_body(_OBJECT, "The workflow's input.", required=False),
            errors=(400, 404, 413),
        ),
        Operation(
            "GET",
            "/api/workflow/{workflowId}",
            "getWorkflow",
            "Read a workflow",
            "workflows",
            {200: json_reply("The workflow.", Workflow)},
            (
                _WORKFLOW_ID,
                Param(
                    "includeTasks",
                    {"type": "boolean", "default": True},
                    "Include the workflow's tasks.",
                ),
            ),
            errors=(400, 404),
        ),
        Operation(
            "DELETE",
            "/api/workflow/{workflowId}",
            "terminateWorkflow",
            "Terminate a running workflow",
            "workflows",
            {200: empty_reply("The workflow is terminated.")},
            (_WORKFLOW_ID, Param("reason", {"type": "string"}, "Why.")),
            errors=(404, 409),
        ),
    ]


def _flag(name: str) -> Schema:
    return {
        "type": "object",
        "properties": {name: {"type": "boolean", "const": True}},
        "required": [name],
    }


def _operational_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/health",
            "health",
            "Liveness: the process answers",
            "operations",
            {200: json_reply("Alive.", _flag("healthy"))},
        ),
        Operation(
            "GET",
            "/ready",
            "ready",
            "Readiness: the broker and the store answer",
            "operations",
            {200: json_reply("Ready; 503 otherwise.", _flag("ready"))},
        ),
        Operation(
            "GET",
            "/metrics",
            "metrics",
            "Prometheus metrics",
            "operations",
            {200: text_reply("The Prometheus text exposition.")},
        ),
        Operation(
            "GET",
            DOCS_PATH,
            "apiDocs",
            "This OpenAPI document",
            "operations",
            {200: json_reply("The document.", _OBJECT)},
        ),
    ]


def document(settings: Settings) -> Schema:
    """The OpenAPI document of the gateway running with `settings`."""
    return build_document(describe(settings), _info(settings))


def _info(settings: Settings) -> Schema:
    try:
        version = metadata.version("baton")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "title": "Baton",
        "version": version,
        "description": (
            "Conductor's worker-facing REST API (tasks, metadata, workflows) "
            "on RabbitMQ and MongoDB. Limits: a request body up to "
            f"{settings.max_body_bytes} bytes; a task's outputData and a "
            f"workflow's input up to {settings.max_payload_bytes} bytes of "
            f"JSON; a log line up to {settings.max_log_bytes} bytes, a task "
            f"keeping its newest {settings.max_logs_per_task} lines; "
            f"{settings.max_waiting_polls} polls held at once per gateway."
        ),
    }


async def serve(request: web.Request) -> web.StreamResponse:
    """The OpenAPI document, as JSON."""
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")


def add_route(app: web.Application, settings: Settings) -> None:
    """Serve the document at `GET /api-docs`."""
    app[DOCUMENT] = msgspec.json.encode(document(settings))
    app.router.add_get(DOCS_PATH, serve)
