"""Fixtures of the fault suite, and the table it prints at the end."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator

import pytest

from tests.chaos.rabbitmq_node import RabbitNode, unavailable_reason
from tests.chaos.report import LEGEND, OUTCOMES, notes, table


@pytest.fixture(scope="session")
def chaos_amqp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A RabbitMQ that only the fault suite uses, for the whole session.

    Other suites on the machine may restart the shared broker (one test
    does, on purpose), which would fault every scenario at once; so the
    scenarios run on a node of their own where this machine can start
    one, and on the suite's broker otherwise.
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
