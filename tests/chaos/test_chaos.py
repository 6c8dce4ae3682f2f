"""Every fault scenario: short in `make test`, full in `make chaos`.

A scenario passes when its books balance: every workflow ended COMPLETED,
each step was completed once, no task was in two workers' hands at once,
no queue holds a message, and no answer was a 5xx other than 503.

The short runs spend most of their time waiting (outages, response
timeouts, reconnects) and share no backend they fault, so they run side
by side, a few at a time, the first time one of them is asked for; each
test then reports its own. Full runs go one at a time, so that their
recovery times are not skewed by each other.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.chaos.deployment import Resources
from tests.chaos.report import OUTCOMES
from tests.chaos.runner import FULL, SHORT, Outcome, Scenario, run
from tests.chaos.scenarios import SCENARIOS
from tests.fixtures.rabbitmq_node import unavailable_reason

SHORT_RUNS_AT_ONCE = 4

_IDS = [s.name for s in SCENARIOS]
_Results = dict[str, Outcome | BaseException | str]


def _explain(outcome: Outcome) -> str:
    lines = [f"{outcome.scenario} ({outcome.scale}): {len(outcome.problems)} problems"]
    lines += [f"  {problem}" for problem in outcome.problems[:30]]
    lines += [f"  fault: {note}" for note in outcome.notes]
    lines += [f"  log: {path}" for path in outcome.logs]
    return "\n".join(lines)


def _check(outcome: Outcome) -> None:
    OUTCOMES.append(outcome)
    assert not outcome.problems and outcome.books.lost == 0, _explain(outcome)


def _selected(session: pytest.Session) -> list[Scenario]:
    return [
        item.callspec.params["scenario"]
        for item in session.items
        if isinstance(item, pytest.Function)
        and item.originalname == "test_books_balance_after_short_run_of"
    ]


def _resources(
    request: pytest.FixtureRequest, scenario: Scenario, directory: Path
) -> Resources | str:
    """What `scenario` needs, resolved now (fixtures cannot be requested
    from the thread the runs use); a string says why it cannot run."""
    topology = scenario.topology
    reason = unavailable_reason()
    if topology.broker == "private-rabbitmq" and reason:
        return f"needs a RabbitMQ node of its own: {reason}"
    amqp = mongodb = ""
    if topology.broker == "rabbitmq":
        amqp = str(request.getfixturevalue("chaos_amqp_url"))
    if topology.store == "mongodb":
        mongodb = str(request.getfixturevalue("mongodb_url"))
    return Resources(directory=directory, amqp_url=amqp, mongodb_url=mongodb)


async def _run_all(plans: dict[str, tuple[Scenario, Resources]]) -> _Results:
    slots = asyncio.Semaphore(SHORT_RUNS_AT_ONCE)

    async def one(scenario: Scenario, resources: Resources) -> Outcome:
        async with slots:
            return await run(scenario, SHORT, resources)

    names = list(plans)
    results = await asyncio.gather(
        *(one(*plans[name]) for name in names), return_exceptions=True
    )
    return dict(zip(names, results, strict=True))


@pytest.fixture(scope="session")
def short_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> _Results:
    """The short run of every selected scenario, made together once."""
    results: _Results = {}
    plans: dict[str, tuple[Scenario, Resources]] = {}
    for scenario in _selected(request.session):
        directory = tmp_path_factory.mktemp(f"chaos-{scenario.name}")
        resources = _resources(request, scenario, directory)
        if isinstance(resources, str):
            results[scenario.name] = resources
        else:
            plans[scenario.name] = (scenario, resources)
    # Its own loop in its own thread: this fixture may first be asked for
    # while another event loop runs in this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        results.update(pool.submit(asyncio.run, _run_all(plans)).result())
    return results


@pytest.mark.timeout(900)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=_IDS)
def test_books_balance_after_short_run_of(
    scenario: Scenario, short_runs: _Results
) -> None:
    result = short_runs[scenario.name]
    if isinstance(result, str):
        pytest.skip(result)
    if isinstance(result, BaseException):
        raise result
    _check(result)


@pytest.mark.chaos
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=_IDS)
async def test_books_balance_after_full_run_of(
    scenario: Scenario, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    resources = _resources(request, scenario, tmp_path)
    if isinstance(resources, str):
        pytest.skip(resources)
    _check(await run(scenario, FULL, resources))
