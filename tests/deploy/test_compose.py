"""deploy/compose.yaml names the services and the variables Baton reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk import environment_variables as otel_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
CONFIG_SOURCE = ROOT / "shared" / "config.py"
BATON_SERVICES = ("gateway", "scheduler")
PORTS = {"gateway": ("BATON_PORT", 8080), "scheduler": ("BATON_SCHEDULER_PORT", 8081)}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def environment(name: str) -> dict[str, str]:
    env = service(name)["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def names_baton_reads() -> set[str]:
    """Every variable name shared/config.py reads."""
    source = CONFIG_SOURCE.read_text()
    return set(re.findall(r'"((?:AMQP_URL|MONGODB_URL|BATON_[A-Z_]+))"', source))


def otel_names() -> set[str]:
    """Every variable the OpenTelemetry SDK (a Baton dependency) defines."""
    return {name for name in dir(otel_env) if name.startswith("OTEL_")}


def test_the_regex_finds_the_configuration() -> None:
    names = names_baton_reads()
    assert {"AMQP_URL", "MONGODB_URL", "BATON_PORT", "BATON_RUN_SCHEDULER"} <= names
    assert len(names) >= 20


def test_five_services() -> None:
    assert set(compose()["services"]) == {
        "rabbitmq",
        "mongo",
        "jaeger",
        "gateway",
        "scheduler",
    }
    assert service("rabbitmq")["image"].startswith("rabbitmq:")
    assert service("mongo")["image"] == "mongo:8"
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", service("jaeger")["image"])


def test_jaeger_exposes_otlp_and_ui() -> None:
    published = {str(port).split(":")[-1] for port in service("jaeger")["ports"]}
    assert {"4317", "4318", "16686"} <= published


@pytest.mark.parametrize("name", BATON_SERVICES)
def test_baton_env_names_are_ones_the_code_reads(name: str) -> None:
    env = environment(name)
    unknown = set(env) - names_baton_reads() - otel_names()
    assert unknown == set(), f"{name} sets variables nothing reads: {unknown}"
    assert env["AMQP_URL"].startswith("amqp://") and "@rabbitmq:5672" in env["AMQP_URL"]
    assert env["MONGODB_URL"] == "mongodb://mongo:27017"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["OTEL_SERVICE_NAME"] == f"baton-{name}"


def test_gateway_leaves_the_scheduler_to_its_service() -> None:
    assert environment("gateway")["BATON_RUN_SCHEDULER"] == "false"
    assert "BATON_RUN_SCHEDULER" not in environment("scheduler")


@pytest.mark.parametrize("name", BATON_SERVICES)
def test_baton_services_build_run_and_check_health(name: str) -> None:
    svc = service(name)
    assert svc["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert (COMPOSE.parent / svc["build"]["context"] / "Dockerfile").is_file()
    assert svc["command"] == ["python", "-m", f"services.{name}"]
    variable, port = PORTS[name]
    assert environment(name)[variable] == str(port)
    assert f"{port}:{port}" in svc["ports"]
    probe = " ".join(svc["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/health" in probe
    assert svc["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "mongo": {"condition": "service_healthy"},
        "jaeger": {"condition": "service_started"},
    }


@pytest.mark.parametrize("name", ["rabbitmq", "mongo"])
def test_backends_have_healthchecks(name: str) -> None:
    assert service(name)["healthcheck"]["test"][0] == "CMD"


def test_dockerfile_matches() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "pip install ." in dockerfile and "-e ." not in dockerfile
    assert re.search(r"^USER (?!root|0\b)", dockerfile, re.M)
    assert re.search(r"^EXPOSE 8080 8081$", dockerfile, re.M)
    assert 'CMD ["python", "-m", "services.gateway"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".venv/", ".git/", "__pycache__/", "*.db"):
        assert pattern in ignored
