"""The official JavaScript SDK (@io-orkes/conductor-javascript), unchanged,
against Baton: its workers run in a Node process (tests/js/worker.mjs) and
every result is read back through the REST API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import IO, Any

import pytest

from shared.auth import KeyHash
from shared.config import Settings
from tests.fixtures.processes import PROJECT_ROOT
from tests.services.conftest import Baton, unique
from tests.services.test_auth import KEY_ID, SECRET, SIGNING_KEY, sign_in

JS_PROJECT = PROJECT_ROOT / "tests" / "js"
WORKER_SCRIPT = JS_PROJECT / "worker.mjs"
SDK_PACKAGE = "@io-orkes/conductor-javascript"
SDK_MANIFEST = JS_PROJECT / "node_modules" / SDK_PACKAGE / "package.json"
MIN_NODE_MAJOR = 18
WAIT_S = 30.0
STOP_GRACE_S = 5.0

# The SDK reads these (and CONDUCTOR_WORKER_* overrides) from the
# environment: never inherited from the one pytest runs in, so each test
# states what its worker uses.
_SDK_ENV_PREFIXES = ("CONDUCTOR_", "conductor.")


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` executable, with the pinned SDK installed for it.

    Skips when Node.js (or npm, which installs the SDK) is missing; fails
    when npm is there but the SDK was not installed from tests/js.
    """
    executable = shutil.which("node")
    if executable is None:
        pytest.skip("node is not on PATH: the JavaScript SDK tests need Node.js")
    version = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        pytest.skip(f"node {version} is older than the SDK's {MIN_NODE_MAJOR}")
    if not SDK_MANIFEST.exists():
        if shutil.which("npm") is None:
            pytest.skip(f"npm is not on PATH, so {SDK_PACKAGE} is not installed")
        pytest.fail(
            f"{SDK_PACKAGE} is not installed: run `make install` "
            "(npm ci --prefix tests/js)"
        )
    return executable


@dataclasses.dataclass
class JsWorker:
    """One Node process running SDK workers, and where its output goes."""

    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] = dataclasses.field(repr=False)

    @property
    def pid(self) -> int:
        """The operating-system process id (`process.pid` inside Node)."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """True until the process has exited."""
        return self.process.poll() is None

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always reaps."""
        if self.running:
            self.process.terminate()
            # Waited for in a thread: the gateway it talks to shares this loop.
            try:
                await asyncio.to_thread(self.process.wait, STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait, 10)
        self._log_file.close()


class JsWorkers:
    """Starts SDK worker processes for one test against one gateway."""

    def __init__(self, node: str, baton: Baton, directory: Path) -> None:
        self._node = node
        self._baton = baton
        self._directory = directory
        self.started: list[JsWorker] = []

    def start(
        self, behaviours: Mapping[str, str], env: Mapping[str, str] | None = None
    ) -> JsWorker:
        """Run a worker process polling each task type in `behaviours`
        with the behaviour named for it (see tests/js/worker.mjs).

        The SDK is pointed at the gateway by CONDUCTOR_SERVER_URL alone;
        `env` adds more variables, such as credentials.
        """
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_SDK_ENV_PREFIXES)
        }
        environment["CONDUCTOR_SERVER_URL"] = self._baton.url
        environment.update(env or {})
        log_path = self._directory / f"js-worker-{len(self.started)}.log"
        log_file = log_path.open("wb")
        try:
            process = subprocess.Popen(
                [
                    self._node,
                    str(WORKER_SCRIPT),
                    *(f"{task}={how}" for task, how in behaviours.items()),
                ],
                cwd=JS_PROJECT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            log_file.close()
            raise
        worker = JsWorker(process, log_path, log_file)
        self.started.append(worker)
        return worker


@pytest.fixture
async def js_workers(
    node: str, baton: Baton, tmp_path: Path
) -> AsyncIterator[JsWorkers]:
    """Start SDK worker processes in a test; all are stopped after it,
    before its gateway."""
    workers = JsWorkers(node, baton, tmp_path)
    try:
        yield workers
    finally:
        for worker in workers.started:
            await worker.stop()


@pytest.fixture
def auth(request: pytest.FixtureRequest) -> bool:
    """Whether the gateway has an API key, or runs open (default)."""
    return bool(getattr(request, "param", False))


@pytest.fixture(scope="module")
def key_hash() -> KeyHash:
    """The stored hash of SECRET (scrypt is slow on purpose: made once)."""
    return KeyHash.of(SECRET)


@pytest.fixture
def settings(
    settings: Settings, auth: bool, request: pytest.FixtureRequest
) -> Settings:
    """The backend's settings, with one API key while `auth` is on."""
    if not auth:
        return settings
    return dataclasses.replace(
        settings,
        auth_keys=((KEY_ID, request.getfixturevalue("key_hash")),),
        auth_signing_key=SIGNING_KEY,
    )


async def register(baton: Baton, name: str, task_types: list[str]) -> None:
    """Register a sequential workflow of SIMPLE tasks `t0`, `t1`, ...: the
    first gets the workflow input `x` as `value`, each later one the
    previous task's `value` and `seen`; the workflow outputs the last
    task's `value`, `seen` and `pid`."""
    tasks = []
    for position, task_type in enumerate(task_types):
        previous = f"t{position - 1}"
        inputs = (
            {"value": "${workflow.input.x}"}
            if position == 0
            else {
                "value": f"${{{previous}.output.value}}",
                "seen": f"${{{previous}.output.seen}}",
            }
        )
        tasks.append(
            {
                "name": task_type,
                "taskReferenceName": f"t{position}",
                "type": "SIMPLE",
                "inputParameters": inputs,
            }
        )
    last = f"t{len(task_types) - 1}"
    definition = {
        "name": name,
        "version": 1,
        "tasks": tasks,
        "outputParameters": {
            "result": f"${{{last}.output.value}}",
            "seen": f"${{{last}.output.seen}}",
            "pid": f"${{{last}.output.pid}}",
        },
    }
    status, body = await baton.request("POST", "/metadata/workflow", json=definition)
    assert status == 200, body


async def register_retried_task(baton: Baton, task_type: str) -> None:
    """A task definition allowing two immediate retries after a FAILED."""
    status, body = await baton.request(
        "POST",
        "/metadata/taskdefs",
        json=[{"name": task_type, "retryCount": 2, "retryDelaySeconds": 0}],
    )
    assert status == 200, body


async def wait_for_end(baton: Baton, workflow_id: str, worker: JsWorker) -> Any:
    """Read the workflow until it has ended; fail with the worker's log if
    it still runs after WAIT_S or the worker process exits first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        workflow = await baton.workflow(workflow_id)
        if workflow["status"] != "RUNNING":
            return workflow
        if not worker.running:
            pytest.fail(
                f"the JavaScript worker exited with {worker.process.returncode} "
                f"while workflow {workflow_id} ran:\n{worker.log()[-4000:]}"
            )
        await asyncio.sleep(0.05)
    pytest.fail(
        f"workflow {workflow_id} still running after {WAIT_S}s; "
        f"JavaScript worker log:\n{worker.log()[-4000:]}"
    )


async def task_logs(baton: Baton, task_id: str) -> list[str]:
    """The execution log lines of a task, as the worker sent them."""
    status, logs = await baton.request("GET", f"/tasks/{task_id}/log")
    assert status == 200, logs
    return [entry["log"] for entry in logs]


def assert_used_update_v2(worker: JsWorker) -> None:
    """The SDK reported its results through POST /api/tasks/update-v2: it
    logs when it has to fall back to the v1 endpoint."""
    assert "falling back to legacy" not in worker.log(), worker.log()


async def test_js_workers_complete_a_three_task_workflow(
    baton: Baton, js_workers: JsWorkers
) -> None:
    types = [unique("js_a"), unique("js_b"), unique("js_c")]
    name = unique("js_wf")
    await register(baton, name, types)
    worker = js_workers.start(dict.fromkeys(types, "add-one"))

    workflow_id = await baton.start(name, {"x": 10})
    workflow = await wait_for_end(baton, workflow_id, worker)

    assert workflow["status"] == "COMPLETED", workflow.get("reasonForIncompletion")
    assert workflow["output"] == {
        "result": 13,
        "seen": ["t0", "t1", "t2"],
        "pid": worker.pid,
    }
    tasks = workflow["tasks"]
    assert [t["taskType"] for t in tasks] == types
    assert [t["status"] for t in tasks] == ["COMPLETED"] * 3
    assert [t["outputData"]["value"] for t in tasks] == [11, 12, 13]
    assert tasks[2]["inputData"] == {"value": 12, "seen": ["t0", "t1"]}
    assert {t["workerId"] for t in tasks} == {socket.gethostname()}
    assert_used_update_v2(worker)


async def test_js_worker_runs_the_tasks_update_v2_hands_back(
    baton: Baton, js_workers: JsWorkers
) -> None:
    """With tasks waiting, update-v2 answers a result with the next task of
    its type, and the SDK runs that one without polling for it."""
    task_type = unique("js_backlog")
    name = unique("js_wf")
    await register(baton, name, [task_type])
    inputs = [0, 1, 2, 3, 4]
    workflow_ids = [await baton.start(name, {"x": x}) for x in inputs]
    # At DEBUG the SDK logs each task it takes from an update-v2 answer.
    worker = js_workers.start({task_type: "add-one"}, {"CONDUCTOR_LOG_LEVEL": "DEBUG"})

    workflows = [await wait_for_end(baton, wid, worker) for wid in workflow_ids]

    assert [w["status"] for w in workflows] == ["COMPLETED"] * len(inputs)
    assert [w["output"]["result"] for w in workflows] == [x + 1 for x in inputs]
    chained = worker.log().count("from V2 response (skipping poll cycle)")
    assert chained >= 1, worker.log()
    assert_used_update_v2(worker)


async def test_js_non_retryable_exception_fails_the_workflow(
    baton: Baton, js_workers: JsWorkers
) -> None:
    task_type = unique("js_refuse")
    name = unique("js_wf")
    await register_retried_task(baton, task_type)
    await register(baton, name, [task_type])
    worker = js_workers.start({task_type: "refuse"})

    workflow_id = await baton.start(name, {"x": 1})
    workflow = await wait_for_end(baton, workflow_id, worker)

    assert workflow["status"] == "FAILED"
    assert "this input can never work" in workflow["reasonForIncompletion"]
    # Terminal although the definition allows retries: a single attempt.
    [task] = workflow["tasks"]
    assert task["status"] == "FAILED_WITH_TERMINAL_ERROR"
    assert task["retryCount"] == 0
    assert task["reasonForIncompletion"] == "this input can never work"
    logs = await task_logs(baton, task["taskId"])
    assert any(
        line.startswith("NonRetryableException: this input can never work")
        for line in logs
    ), logs
    assert_used_update_v2(worker)


async def test_js_worker_failing_once_succeeds_on_retry(
    baton: Baton, js_workers: JsWorkers
) -> None:
    task_type = unique("js_flaky")
    name = unique("js_wf")
    await register_retried_task(baton, task_type)
    await register(baton, name, [task_type])
    worker = js_workers.start({task_type: "flaky"})

    workflow_id = await baton.start(name, {"x": 5})
    workflow = await wait_for_end(baton, workflow_id, worker)

    assert workflow["status"] == "COMPLETED", workflow.get("reasonForIncompletion")
    first, second = workflow["tasks"]
    assert (first["status"], second["status"]) == ("FAILED", "COMPLETED")
    assert (first["retryCount"], second["retryCount"]) == (0, 1)
    assert first["reasonForIncompletion"] == "transient failure"
    assert second["outputData"] == {"value": 5, "attempt": 1}
    logs = await task_logs(baton, first["taskId"])
    assert any(line.startswith("Error: transient failure") for line in logs), logs
    assert_used_update_v2(worker)


@pytest.mark.parametrize("auth", [True, False], indirect=True, ids=["on", "off"])
async def test_js_sdk_with_credentials_completes_a_workflow(
    baton: Baton, js_workers: JsWorkers, auth: bool
) -> None:
    """With CONDUCTOR_AUTH_KEY and CONDUCTOR_AUTH_SECRET set, the SDK
    trades them for a token where authentication is on, and takes the
    404 from POST /api/token for an open server where it is off."""
    task_type = unique("js_authed")
    name = unique("js_wf")
    poll = f"/tasks/poll/batch/{task_type}"
    if auth:
        status, body = await baton.request("GET", poll)
        assert status == 401, body
        await sign_in(baton)
    else:
        status, body = await baton.request(
            "POST", "/token", json={"keyId": KEY_ID, "keySecret": SECRET}
        )
        assert status == 404, body
    await register(baton, name, [task_type])
    worker = js_workers.start(
        {task_type: "add-one"},
        {"CONDUCTOR_AUTH_KEY": KEY_ID, "CONDUCTOR_AUTH_SECRET": SECRET},
    )

    workflow_id = await baton.start(name, {"x": 1})
    workflow = await wait_for_end(baton, workflow_id, worker)

    assert workflow["status"] == "COMPLETED", workflow.get("reasonForIncompletion")
    assert workflow["output"] == {"result": 2, "seen": ["t0"], "pid": worker.pid}
    assert_used_update_v2(worker)


def test_sdk_pin_matches_the_lockfile() -> None:
    """The installed SDK is the exact version package.json pins and
    package-lock.json records, so every run tests the same SDK."""
    manifest = json.loads((JS_PROJECT / "package.json").read_text())
    lock = json.loads((JS_PROJECT / "package-lock.json").read_text())
    pinned = manifest["dependencies"][SDK_PACKAGE]
    assert pinned[0].isdigit(), f"{SDK_PACKAGE} must be pinned exactly: {pinned}"
    assert lock["packages"][f"node_modules/{SDK_PACKAGE}"]["version"] == pinned
    if SDK_MANIFEST.exists():
        installed = json.loads(SDK_MANIFEST.read_text())["version"]
        assert installed.lstrip("v") == pinned
