"""`/api/workflow`: start, read and terminate workflows."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.gateway.context import context
from services.gateway.http import (
    decode_body,
    json_response,
    query_bool,
    query_int,
    read_body,
    text_response,
)
from shared.models import StartWorkflowRequest

routes = web.RouteTableDef()


@routes.post("/api/workflow")
async def start(request: web.Request) -> web.StreamResponse:
    start_request = await decode_body(request, StartWorkflowRequest)
    workflow_id = await context(request).engine.start_workflow(start_request)
    return text_response(workflow_id)


@routes.post("/api/workflow/{name}")
async def start_by_name(request: web.Request) -> web.StreamResponse:
    version = query_int(request, "version", 0, minimum=0) or None
    priority = query_int(request, "priority", 0, minimum=0, maximum=99)
    body = await read_body(request)
    workflow_input = await decode_body(request, dict[str, Any]) if body.strip() else {}
    start_request = StartWorkflowRequest(
        name=request.match_info["name"],
        version=version,
        correlationId=request.query.get("correlationId") or None,
        priority=priority,
        input=workflow_input,
    )
    workflow_id = await context(request).engine.start_workflow(start_request)
    return text_response(workflow_id)


@routes.get("/api/workflow/{workflowId}")
async def get(request: web.Request) -> web.StreamResponse:
    include_tasks = query_bool(request, "includeTasks", True)
    workflow = await context(request).engine.get_workflow(
        request.match_info["workflowId"], include_tasks
    )
    return json_response(workflow)


@routes.delete("/api/workflow/{workflowId}")
async def terminate(request: web.Request) -> web.StreamResponse:
    await context(request).engine.terminate_workflow(
        request.match_info["workflowId"], request.query.get("reason") or None
    )
    return web.Response(status=200)
