"""`/api/tasks`: the worker-facing task API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, cast

import msgspec
from aiohttp import web

from services.gateway.context import Context, context
from services.gateway.http import (
    NO_CONTENT,
    decode_body,
    json_response,
    path_name,
    query_int,
    query_name,
    read_body,
    text_response,
)
from services.gateway.poller import answer, give_back
from services.health import OPERATIONS, unavailable
from shared.errors import BadRequest
from shared.metrics import METRICS
from shared.models import ResultStatus, TaskResult
from shared.queues import check_name, queue_name

routes = web.RouteTableDef()

SINGLE_POLL_TIMEOUT_MS = 100
_RESULT_STATUSES = ("IN_PROGRESS", "FAILED", "FAILED_WITH_TERMINAL_ERROR", "COMPLETED")
_OutputMap = dict[str, Any]


def _draining(request: web.Request) -> web.Response | None:
    """A 503 for a poll once the gateway shuts down, so that workers take
    their next poll to another replica instead of waiting here."""
    if request.app[OPERATIONS].readiness.draining:
        return unavailable("the gateway is shutting down; poll another replica")
    return None


@routes.get("/api/tasks/poll/batch/{taskType}", allow_head=False)
async def poll_batch(request: web.Request) -> web.StreamResponse:
    if refused := _draining(request):
        return refused
    ctx = context(request)
    task_type = path_name(request, "taskType")
    domain = query_name(request, "domain")
    worker_id = request.query.get("workerid") or None
    count = query_int(
        request, "count", 1, minimum=0, maximum=ctx.settings.max_poll_count
    )
    timeout = query_int(
        request, "timeout", 100, minimum=0, maximum=ctx.settings.max_poll_timeout_ms
    )
    tasks, deliveries = await ctx.poller.poll(
        request, task_type, domain, worker_id, count, timeout
    )
    return await answer(request, json_response(tasks), deliveries)


@routes.get("/api/tasks/poll/{taskType}", allow_head=False)
async def poll_one(request: web.Request) -> web.StreamResponse:
    if refused := _draining(request):
        return refused
    ctx = context(request)
    task_type = path_name(request, "taskType")
    domain = query_name(request, "domain")
    worker_id = request.query.get("workerid") or None
    return await _poll_single(request, ctx, task_type, domain, worker_id)


async def _poll_single(
    request: web.Request,
    ctx: Context,
    task_type: str,
    domain: str | None,
    worker_id: str | None,
    alongside: Coroutine[Any, Any, None] | None = None,
) -> web.StreamResponse:
    """Poll one task and answer with it; run `alongside` meanwhile, the
    poll's deliveries going back if it fails."""
    polling = ctx.poller.poll(
        request, task_type, domain, worker_id, 1, SINGLE_POLL_TIMEOUT_MS
    )
    if alongside is None:
        tasks, deliveries = await polling
    else:
        running = asyncio.ensure_future(polling)
        try:
            await alongside
        except BaseException:
            await give_back(running)
            raise
        tasks, deliveries = await running
    if not tasks:
        return web.Response(status=NO_CONTENT)
    return await answer(request, json_response(tasks[0]), deliveries)


@routes.post("/api/tasks")
async def update_v1(request: web.Request) -> web.StreamResponse:
    result = await decode_body(request, TaskResult)
    METRICS.child(METRICS.updates, str(result.status)).inc()
    task = await context(request).engine.update_task(result)
    return text_response(task.taskId)


@routes.post("/api/tasks/update-v2")
async def update_v2(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    result = await decode_body(request, TaskResult)
    METRICS.child(METRICS.updates, str(result.status)).inc()
    update = await ctx.engine.record_update(result)
    task = update.task
    # The update stands whatever follows: a saturated gateway skips the
    # chained poll rather than fail a request whose update it applied.
    if not task.terminal or result.extendLease or ctx.poller.saturated:
        await ctx.engine.follow_up(update)
        return web.Response(status=NO_CONTENT)

    # The next task of the workflow and the next task for this worker are
    # independent: their store writes go together.
    return await _poll_single(
        request,
        ctx,
        task.taskType,
        task.domain or None,
        result.workerId,
        alongside=ctx.engine.follow_up(update),
    )


@routes.post("/api/tasks/{workflowId}/{taskRefName}/{status}")
async def update_by_reference(request: web.Request) -> web.StreamResponse:
    status = request.match_info["status"]
    if status not in _RESULT_STATUSES:
        raise BadRequest(
            f"status must be one of {', '.join(_RESULT_STATUSES)}",
            path="status",
            invalid_value=status,
        )
    output = await decode_body(request, _OutputMap)
    METRICS.child(METRICS.updates, status).inc()
    task_id = await context(request).engine.update_task_by_ref(
        request.match_info["workflowId"],
        request.match_info["taskRefName"],
        _as_status(status),
        output,
        request.query.get("workerid") or None,
    )
    return text_response(task_id or "")


def _as_status(status: str) -> ResultStatus:
    return cast(ResultStatus, status)


@routes.post("/api/tasks/{taskId}/ack")
async def ack(request: web.Request) -> web.StreamResponse:
    held = await context(request).engine.ack(
        request.match_info["taskId"], request.query.get("workerid") or None
    )
    return text_response("true" if held else "false")


@routes.get("/api/tasks/queue/sizes")
async def queue_sizes(request: web.Request) -> web.StreamResponse:
    task_types = request.query.getall("taskType", [])
    if not task_types:
        raise BadRequest("taskType is required", path="taskType")
    names = [check_name(t, "taskType") for t in task_types]
    broker = context(request).broker
    stats = await asyncio.gather(*(broker.stats(name) for name in names))
    return json_response({name: s.ready for name, s in zip(names, stats, strict=True)})


@routes.get("/api/tasks/queue/size")
async def queue_size(request: web.Request) -> web.StreamResponse:
    task_type = query_name(request, "taskType")
    if task_type is None:
        raise BadRequest("taskType is required", path="taskType")
    domain = query_name(request, "domain")
    stats = await context(request).broker.stats(queue_name(task_type, domain))
    return json_response(stats.ready)


@routes.get("/api/tasks/queue/all")
async def queue_all(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    names = await ctx.store.list_queues()
    stats = await asyncio.gather(*(ctx.broker.stats(name) for name in names))
    return json_response({n: s.ready for n, s in zip(names, stats, strict=True)})


@routes.get("/api/tasks/queue/all/verbose")
async def queue_all_verbose(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    names = await ctx.store.list_queues()
    stats = await asyncio.gather(*(ctx.broker.stats(name) for name in names))
    return json_response(
        {
            name: {"a": {"size": s.ready, "uacked": s.unacked}}
            for name, s in zip(names, stats, strict=True)
        }
    )


@routes.get("/api/tasks/queue/polldata")
async def poll_data(request: web.Request) -> web.StreamResponse:
    task_type = query_name(request, "taskType")
    if task_type is None:
        raise BadRequest("taskType is required", path="taskType")
    return json_response(await context(request).polls.read(task_type))


@routes.get("/api/tasks/queue/polldata/all")
async def poll_data_all(request: web.Request) -> web.StreamResponse:
    return json_response(await context(request).polls.read(None))


@routes.post("/api/tasks/queue/requeue/{taskType}")
async def requeue(request: web.Request) -> web.StreamResponse:
    task_type = path_name(request, "taskType")
    count = await context(request).engine.requeue(task_type)
    return text_response(str(count))


@routes.get("/api/tasks/{taskId}")
async def get_task(request: web.Request) -> web.StreamResponse:
    task = await context(request).engine.get_task(request.match_info["taskId"])
    return json_response(task)


@routes.post("/api/tasks/{taskId}/log")
async def add_log(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadRequest("log must be UTF-8 text", path="$") from None
    if text.startswith('"'):
        with contextlib.suppress(msgspec.DecodeError):
            text = msgspec.json.decode(body, type=str)
    await context(request).engine.add_log(request.match_info["taskId"], text)
    return web.Response(status=200)


@routes.get("/api/tasks/{taskId}/log")
async def get_logs(request: web.Request) -> web.StreamResponse:
    logs = await context(request).store.get_logs(request.match_info["taskId"])
    if not logs:
        return web.Response(status=NO_CONTENT)
    return json_response(logs)
