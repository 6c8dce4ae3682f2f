"""`/api/metadata`: task and workflow definitions."""

from __future__ import annotations

from aiohttp import web

from services.gateway.context import context
from services.gateway.http import decode_body, json_response, query_bool, query_int
from shared.clock import now_ms
from shared.definitions import validate_task_def, validate_workflow_def
from shared.errors import BadRequest, Conflict, NotFound
from shared.models import BulkResponse, TaskDef, WorkflowDef

routes = web.RouteTableDef()


@routes.post("/api/metadata/taskdefs")
async def register_task_defs(request: web.Request) -> web.StreamResponse:
    defs = await decode_body(request, list[TaskDef])
    if not defs:
        raise BadRequest("at least one task definition is required", path="$")
    for position, definition in enumerate(defs):
        try:
            validate_task_def(definition)
        except BadRequest as exc:
            exc.path = f"[{position}].{exc.path}"
            raise
    now = now_ms()
    ctx = context(request)
    await ctx.store.upsert_task_defs([_stamped(d, now) for d in defs])
    ctx.engine.definitions.forget()
    return web.Response(status=200)


@routes.put("/api/metadata/taskdefs")
async def update_task_def(request: web.Request) -> web.StreamResponse:
    definition = await decode_body(request, TaskDef)
    validate_task_def(definition)
    ctx = context(request)
    existing = await ctx.store.get_task_def(definition.name)
    if existing is None:
        raise NotFound(f"No such taskType found by name: {definition.name}")
    definition.createTime = existing.createTime
    definition.updateTime = now_ms()
    await ctx.store.upsert_task_defs([definition])
    ctx.engine.definitions.forget()
    return web.Response(status=200)


@routes.get("/api/metadata/taskdefs")
async def list_task_defs(request: web.Request) -> web.StreamResponse:
    return json_response(await context(request).store.list_task_defs())


@routes.get("/api/metadata/taskdefs/{taskType}")
async def get_task_def(request: web.Request) -> web.StreamResponse:
    name = request.match_info["taskType"]
    definition = await context(request).store.get_task_def(name)
    if definition is None:
        raise NotFound(f"No such taskType found by name: {name}")
    return json_response(definition)


@routes.delete("/api/metadata/taskdefs/{taskType}")
async def delete_task_def(request: web.Request) -> web.StreamResponse:
    name = request.match_info["taskType"]
    ctx = context(request)
    if not await ctx.store.delete_task_def(name):
        raise NotFound(f"No such taskType found by name: {name}")
    ctx.engine.definitions.forget()
    return web.Response(status=200)


@routes.post("/api/metadata/workflow")
async def register_workflow_def(request: web.Request) -> web.StreamResponse:
    overwrite = query_bool(request, "overwrite", False)
    definition = await decode_body(request, WorkflowDef)
    validate_workflow_def(definition)
    ctx = context(request)
    definition.createTime = definition.createTime or now_ms()
    if not await ctx.store.put_workflow_def(definition, overwrite):
        raise Conflict(
            f"Workflow with {definition.name}.{definition.version} already exists!"
        )
    ctx.engine.definitions.forget()
    return web.Response(status=200)


@routes.put("/api/metadata/workflow")
async def update_workflow_defs(request: web.Request) -> web.StreamResponse:
    defs = await decode_body(request, list[WorkflowDef])
    for position, definition in enumerate(defs):
        try:
            validate_workflow_def(definition)
        except BadRequest as exc:
            exc.path = f"[{position}].{exc.path}"
            raise
    ctx = context(request)
    response = BulkResponse()
    for definition in defs:
        definition.updateTime = now_ms()
        await ctx.store.put_workflow_def(definition, True)
        response.bulkSuccessfulResults.append(definition.name)
    ctx.engine.definitions.forget()
    return json_response(response)


@routes.get("/api/metadata/workflow")
async def list_workflow_defs(request: web.Request) -> web.StreamResponse:
    return json_response(await context(request).store.list_workflow_defs())


@routes.get("/api/metadata/workflow/{name}")
async def get_workflow_def(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    version = query_int(request, "version", 0, minimum=0) or None
    definition = await context(request).store.get_workflow_def(name, version)
    if definition is None:
        raise NotFound(f"No such workflow found by name: {name}, version: {version}")
    return json_response(definition)


def _stamped(definition: TaskDef, now: int) -> TaskDef:
    definition.createTime = definition.createTime or now
    definition.updateTime = now
    return definition
