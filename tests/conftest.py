"""Fixtures shared by the whole suite: real servers, started or found."""

pytest_plugins = [
    "tests.fixtures.rabbitmq",
    # Before mongodb, which imports its helpers.
    "tests.fixtures.processes",
    "tests.fixtures.mongodb",
]
