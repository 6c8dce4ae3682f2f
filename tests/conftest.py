"""Fixtures shared by the whole suite: real servers, started or found."""

pytest_plugins = [
    "tests.fixtures.rabbitmq",
    "tests.fixtures.mongodb",
    "tests.fixtures.processes",
]
