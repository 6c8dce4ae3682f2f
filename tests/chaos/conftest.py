"""Fixtures of the fault suite, and the table it prints at the end."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator

import pytest

from tests.chaos.report import LEGEND, OUTCOMES, notes, table
from tests.fixtures.rabbitmq_node import RabbitNode, unavailable_reason


@pytest.fixture(scope="session")
def chaos_amqp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A RabbitMQ that only the fault suite uses, for the whole session.

    The scenarios stop and cut RabbitMQ, which would fault anything else
    using the machine's broker at the time; so they run on a node of
    their own where this machine can start one, and on the suite's broker
    otherwise.
    """
    if unavailable_reason() is not None:
        yield str(request.getfixturevalue("amqp_url"))
        return
    node = RabbitNode()
    try:
        try:
            node.start()
        except (RuntimeError, subprocess.SubprocessError) as exc:
            message = f"no private RabbitMQ node ({exc}); using the suite's"
            warnings.warn(message, stacklevel=1)
            yield str(request.getfixturevalue("amqp_url"))
            return
        yield node.url
    finally:
        node.destroy()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault suite's table when any scenario ran."""
    if not OUTCOMES:
        return
    terminalreporter.section("fault suite")
    terminalreporter.write_line(table(OUTCOMES))
    terminalreporter.write_line("")
    terminalreporter.write_line(notes(OUTCOMES))
    terminalreporter.write_line("")
    terminalreporter.write_line(LEGEND)
