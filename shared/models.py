"""Conductor's wire models as msgspec Structs.

Field names, defaults and enum values follow Conductor's JSON exactly.
Models that Baton builds itself (`Task`, `Workflow`, `PollData`) mark
absent values with `UNSET`, so they are omitted from the JSON the way
Conductor's Jackson mapper omits nulls. Models that users send accept
`null` for optional fields. Unknown input fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from shared.queues import DOMAINS_PATTERN, NAME_PATTERN

NonNegative = Annotated[int, Meta(ge=0)]
Name = Annotated[str, Meta(min_length=1)]
# A task type becomes a queue name. The rule is enforced by `check_name`
# (with a message that says what is allowed); here it is only described.
TaskName = Annotated[
    str, Meta(min_length=1, extra_json_schema={"pattern": NAME_PATTERN})
]
Domains = Annotated[str, Meta(extra_json_schema={"pattern": DOMAINS_PATTERN})]

TaskStatus = Literal[
    "IN_PROGRESS",
    "SCHEDULED",
    "CANCELED",
    "FAILED",
    "FAILED_WITH_TERMINAL_ERROR",
    "COMPLETED",
    "COMPLETED_WITH_ERRORS",
    "TIMED_OUT",
    "SKIPPED",
]
ResultStatus = Literal[
    "IN_PROGRESS", "FAILED", "FAILED_WITH_TERMINAL_ERROR", "COMPLETED"
]
WorkflowStatus = Literal[
    "RUNNING", "COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED", "PAUSED"
]
TimeoutPolicy = Literal["RETRY", "TIME_OUT_WF", "ALERT_ONLY"]
RetryLogic = Literal["FIXED", "EXPONENTIAL_BACKOFF", "LINEAR_BACKOFF"]

TERMINAL_TASK_STATUSES: Final = frozenset(
    {
        "CANCELED",
        "FAILED",
        "FAILED_WITH_TERMINAL_ERROR",
        "COMPLETED",
        "COMPLETED_WITH_ERRORS",
        "TIMED_OUT",
        "SKIPPED",
    }
)
PENDING_TASK_STATUSES: Final = ("SCHEDULED", "IN_PROGRESS")
TERMINAL_WORKFLOW_STATUSES: Final = frozenset(
    {"COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"}
)


class TaskExecLog(Struct, kw_only=True):
    """One log line a worker attached to a task."""

    log: str | None = None
    taskId: str | None = None
    createdTime: int = 0


class TaskDef(Struct, kw_only=True):
    """A registered task definition, with Conductor's defaults."""

    name: TaskName
    description: str | None = None
    retryCount: NonNegative = 3
    timeoutSeconds: NonNegative = 0
    totalTimeoutSeconds: NonNegative = 0
    inputKeys: list[str] = msgspec.field(default_factory=list)
    outputKeys: list[str] = msgspec.field(default_factory=list)
    timeoutPolicy: TimeoutPolicy = "TIME_OUT_WF"
    retryLogic: RetryLogic = "FIXED"
    retryDelaySeconds: NonNegative = 60
    backoffScaleFactor: Annotated[int, Meta(ge=1)] = 1
    maxRetryDelaySeconds: NonNegative = 0
    backoffJitterMs: NonNegative = 0
    responseTimeoutSeconds: Annotated[int, Meta(ge=1)] = 3600
    concurrentExecLimit: NonNegative | None = None
    inputTemplate: dict[str, Any] = msgspec.field(default_factory=dict)
    rateLimitPerFrequency: NonNegative | None = None
    rateLimitFrequencyInSeconds: NonNegative | None = None
    isolationGroupId: str | None = None
    executionNameSpace: str | None = None
    ownerEmail: str | None = None
    pollTimeoutSeconds: NonNegative | None = None
    ackTimeoutSeconds: NonNegative | None = None
    ownerApp: str | None = None
    createTime: int | None = None
    updateTime: int | None = None
    createdBy: str | None = None
    updatedBy: str | None = None


class WorkflowTask(Struct, kw_only=True):
    """One step of a workflow definition."""

    name: TaskName
    taskReferenceName: Name
    type: str = "SIMPLE"
    description: str | None = None
    inputParameters: dict[str, Any] = msgspec.field(default_factory=dict)
    optional: bool = False
    retryCount: NonNegative | None = None
    startDelay: NonNegative = 0
    taskDefinition: TaskDef | None = None


class WorkflowDef(Struct, kw_only=True):
    """A workflow definition: SIMPLE tasks run in sequence."""

    name: Name
    description: str | None = None
    version: NonNegative = 1
    tasks: list[WorkflowTask] = msgspec.field(default_factory=list)
    inputParameters: list[str] = msgspec.field(default_factory=list)
    outputParameters: dict[str, Any] = msgspec.field(default_factory=dict)
    failureWorkflow: str | None = None
    schemaVersion: int = 2
    restartable: bool = True
    workflowStatusListenerEnabled: bool = False
    ownerEmail: str | None = None
    timeoutPolicy: Literal["TIME_OUT_WF", "ALERT_ONLY"] = "ALERT_ONLY"
    timeoutSeconds: NonNegative = 0
    variables: dict[str, Any] = msgspec.field(default_factory=dict)
    inputTemplate: dict[str, Any] = msgspec.field(default_factory=dict)
    ownerApp: str | None = None
    createTime: int | None = None
    updateTime: int | None = None
    createdBy: str | None = None
    updatedBy: str | None = None


class Task(Struct, kw_only=True):
    """A task instance as the API returns it."""

    taskType: str
    status: TaskStatus
    inputData: dict[str, Any] = msgspec.field(default_factory=dict)
    referenceTaskName: str | UnsetType = UNSET
    retryCount: int = 0
    seq: int = 0
    correlationId: str | UnsetType = UNSET
    pollCount: int = 0
    taskDefName: str | UnsetType = UNSET
    scheduledTime: int = 0
    startTime: int = 0
    endTime: int = 0
    updateTime: int = 0
    startDelayInSeconds: int = 0
    retriedTaskId: str | UnsetType = UNSET
    retried: bool = False
    executed: bool = False
    callbackFromWorker: bool = True
    responseTimeoutSeconds: int = 0
    workflowInstanceId: str | UnsetType = UNSET
    workflowType: str | UnsetType = UNSET
    taskId: str
    reasonForIncompletion: str | UnsetType = UNSET
    callbackAfterSeconds: int = 0
    workerId: str | UnsetType = UNSET
    outputData: dict[str, Any] = msgspec.field(default_factory=dict)
    workflowTask: WorkflowTask | UnsetType = UNSET
    domain: str | UnsetType = UNSET
    rateLimitPerFrequency: int = 0
    rateLimitFrequencyInSeconds: int = 0
    workflowPriority: int = 0
    iteration: int = 0
    firstStartTime: int = 0
    queueWaitTime: int = 0
    loopOverTask: bool = False
    subworkflowChanged: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_TASK_STATUSES


class TaskResult(Struct, kw_only=True):
    """What a worker reports for a task it executed."""

    workflowInstanceId: str | None = None
    taskId: str | None = None
    reasonForIncompletion: str | None = None
    callbackAfterSeconds: NonNegative = 0
    workerId: str | None = None
    status: ResultStatus | None = None
    outputData: dict[str, Any] | None = None
    logs: list[TaskExecLog] | None = None
    externalOutputPayloadStoragePath: str | None = None
    subWorkflowId: str | None = None
    extendLease: bool = False


class PollData(Struct, kw_only=True):
    """The last poll of a task type in a domain, and who made it."""

    queueName: str
    domain: str | UnsetType = UNSET
    workerId: str | UnsetType = UNSET
    lastPollTime: int = 0


class StartWorkflowRequest(Struct, kw_only=True):
    """The body of `POST /api/workflow`."""

    name: Name
    version: NonNegative | None = None
    correlationId: str | None = None
    input: dict[str, Any] | None = None
    taskToDomain: dict[str, Domains] | None = None
    workflowDef: WorkflowDef | None = None
    priority: Annotated[int, Meta(ge=0, le=99)] | None = None
    createdBy: str | None = None
    externalInputPayloadStoragePath: str | None = None
    idempotencyKey: str | None = None
    idempotencyStrategy: str | None = None


class Workflow(Struct, kw_only=True):
    """A workflow instance as the API returns it."""

    workflowId: str
    workflowName: str
    workflowVersion: int
    status: WorkflowStatus
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    output: dict[str, Any] = msgspec.field(default_factory=dict)
    correlationId: str | UnsetType = UNSET
    priority: int = 0
    taskToDomain: dict[str, str] = msgspec.field(default_factory=dict)
    createTime: int = 0
    startTime: int = 0
    endTime: int = 0
    updateTime: int = 0
    reasonForIncompletion: str | UnsetType = UNSET
    failedReferenceTaskNames: list[str] = msgspec.field(default_factory=list)
    tasks: list[Task] = msgspec.field(default_factory=list)
    workflowDefinition: WorkflowDef | UnsetType = UNSET
    variables: dict[str, Any] = msgspec.field(default_factory=dict)
    createdBy: str | UnsetType = UNSET
    lastRetriedTime: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_WORKFLOW_STATUSES


class ValidationError(Struct, kw_only=True):
    """One field-level problem in a rejected request."""

    path: str | UnsetType = UNSET
    message: str
    invalidValue: Any = UNSET


class ErrorResponse(Struct, kw_only=True):
    """Conductor's error body. `error` is set on a 401 only: the official
    SDKs renew their token when it reads EXPIRED_TOKEN or INVALID_TOKEN."""

    status: int
    message: str
    code: str | UnsetType = UNSET
    error: str | UnsetType = UNSET
    instance: str | UnsetType = UNSET
    retryable: bool = False
    validationErrors: list[ValidationError] = msgspec.field(default_factory=list)


class BulkResponse(Struct, kw_only=True):
    """The answer to a bulk definition update."""

    bulkErrorResults: dict[str, str] = msgspec.field(default_factory=dict)
    bulkSuccessfulResults: list[str] = msgspec.field(default_factory=list)
