"""Configuration: one typed object built from environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.auth import MIN_SIGNING_KEY_CHARS, KeyHash, parse_keys
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


def _auth_keys(env: Mapping[str, str]) -> tuple[tuple[str, KeyHash], ...]:
    """The API keys listed in BATON_AUTH_KEYS and in the file that
    BATON_AUTH_KEYS_FILE names, as (keyId, hash) pairs."""
    sources = {"BATON_AUTH_KEYS": env.get("BATON_AUTH_KEYS", "")}
    path = env.get("BATON_AUTH_KEYS_FILE", "")
    if path:
        try:
            sources["BATON_AUTH_KEYS_FILE"] = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"BATON_AUTH_KEYS_FILE: {exc}") from None
    keys: dict[str, KeyHash] = {}
    for name, text in sources.items():
        try:
            listed = parse_keys(text)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        repeated = sorted(listed.keys() & keys.keys())
        if repeated:
            raise ConfigError(f"{name}: keyId {repeated[0]!r} is listed twice")
        keys.update(listed)
    return tuple(keys.items())


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
    max_waiting_polls: int = 10000
    max_payload_bytes: int = 512 << 10
    max_log_bytes: int = 32 << 10
    max_logs_per_task: int = 1000
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
    auth_keys: tuple[tuple[str, KeyHash], ...] = field(default=(), repr=False)
    auth_signing_key: str = field(default="", repr=False)
    auth_token_ttl_seconds: int = 3600

    def __post_init__(self) -> None:
        """Refuse a signing key without keys (auth would silently be off)
        and keys without a signing key that is long enough."""
        if self.auth_signing_key and not self.auth_keys:
            raise ConfigError(
                "BATON_AUTH_SIGNING_KEY is set but BATON_AUTH_KEYS and "
                "BATON_AUTH_KEYS_FILE list no key: authentication would be off"
            )
        if self.auth_keys and len(self.auth_signing_key) < MIN_SIGNING_KEY_CHARS:
            raise ConfigError(
                "API keys are configured, so BATON_AUTH_SIGNING_KEY must be set "
                f"to at least {MIN_SIGNING_KEY_CHARS} characters "
                "(python -m shared.auth signing-key makes one)"
            )

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
            max_waiting_polls=_int(env, "BATON_MAX_WAITING_POLLS", 10000, 1),
            max_payload_bytes=_int(env, "BATON_MAX_PAYLOAD_BYTES", 512 << 10, 1024),
            max_log_bytes=_int(env, "BATON_MAX_LOG_BYTES", 32 << 10, 1),
            max_logs_per_task=_int(env, "BATON_MAX_LOGS_PER_TASK", 1000, 1),
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
            auth_keys=_auth_keys(env),
            auth_signing_key=env.get("BATON_AUTH_SIGNING_KEY", "").strip(),
            auth_token_ttl_seconds=_int(env, "BATON_AUTH_TOKEN_TTL_SECONDS", 3600, 1),
        )
