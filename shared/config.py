"""Configuration: one typed object built from environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import BatonError


class ConfigError(BatonError):
    """An environment variable has a value Baton cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a Baton service reads from its environment."""

    amqp_url: str | None = None
    mongodb_url: str | None = None
    mongodb_database: str = "baton"
    sqlite_path: str = "baton.db"
    host: str = "0.0.0.0"
    port: int = 8080
    scheduler_port: int = 8081
    queue_prefix: str = "baton"
    queue_type: str = "classic"
    prefetch: int = 100
    consumer_linger_ms: int = 500
    max_body_bytes: int = 1 << 20
    max_poll_timeout_ms: int = 5000
    max_poll_count: int = 1000
    active_domain_seconds: int = 10
    poll_data_flush_ms: int = 500
    definition_cache_ms: int = 2000
    run_scheduler: bool = True
    ack_timeout_seconds: int = 0
    timer_flush_ms: int = 1000
    shutdown_grace_seconds: int = 10
    sweep_seconds: int = 30
    reconcile_grace_seconds: int = 10
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `env` (default: the process environment).

        Raises ConfigError naming the variable that is wrong.
        """
        env = os.environ if env is None else env
        queue_type = env.get("BATON_QUEUE_TYPE", "classic")
        if queue_type not in ("classic", "quorum"):
            raise ConfigError(
                f"BATON_QUEUE_TYPE must be 'classic' or 'quorum', got {queue_type!r}"
            )
        return cls(
            amqp_url=env.get("AMQP_URL") or None,
            mongodb_url=env.get("MONGODB_URL") or None,
            mongodb_database=env.get("BATON_MONGODB_DATABASE", "baton"),
            sqlite_path=env.get("BATON_SQLITE_PATH", "baton.db"),
            host=env.get("BATON_HOST", "0.0.0.0"),
            port=_int(env, "BATON_PORT", 8080, 0),
            scheduler_port=_int(env, "BATON_SCHEDULER_PORT", 8081, 0),
            queue_prefix=env.get("BATON_QUEUE_PREFIX", "baton"),
            queue_type=queue_type,
            prefetch=_int(env, "BATON_PREFETCH", 100, 1),
            consumer_linger_ms=_int(env, "BATON_CONSUMER_LINGER_MS", 500),
            max_body_bytes=_int(env, "BATON_MAX_BODY_BYTES", 1 << 20, 1024),
            max_poll_timeout_ms=_int(env, "BATON_MAX_POLL_TIMEOUT_MS", 5000),
            max_poll_count=_int(env, "BATON_MAX_POLL_COUNT", 1000, 1),
            active_domain_seconds=_int(env, "BATON_ACTIVE_DOMAIN_SECONDS", 10),
            poll_data_flush_ms=_int(env, "BATON_POLL_DATA_FLUSH_MS", 500, 10),
            definition_cache_ms=_int(env, "BATON_DEFINITION_CACHE_MS", 2000),
            run_scheduler=_bool(env, "BATON_RUN_SCHEDULER", True),
            ack_timeout_seconds=_int(env, "BATON_ACK_TIMEOUT_SECONDS", 0),
            timer_flush_ms=_int(env, "BATON_TIMER_FLUSH_MS", 1000, 1),
            shutdown_grace_seconds=_int(env, "BATON_SHUTDOWN_GRACE_SECONDS", 10),
            sweep_seconds=_int(env, "BATON_SWEEP_SECONDS", 30, 1),
            reconcile_grace_seconds=_int(env, "BATON_RECONCILE_GRACE_SECONDS", 10),
            log_level=env.get("BATON_LOG_LEVEL", "INFO").upper(),
        )
