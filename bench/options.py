"""The bench's command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

SCENARIOS = ("throughput", "callback", "latency", "idle")
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True, slots=True)
class Options:
    """Everything a bench run is told."""

    scenarios: tuple[str, ...]
    seconds: float
    warmup: float
    workers: int
    gateways: int
    batch: int
    poll_timeout_ms: int
    starters: int
    backlog: int
    callback_ratio: float
    latency_tasks: int
    latency_rate: float
    latency_workers: int
    idle_polls: int
    idle_seconds: float
    verify: int
    drain_timeout: float
    amqp_url: str
    mongodb_url: str | None
    json_path: Path | None
    profile_path: Path | None

    @property
    def store(self) -> str:
        """The store the gateway runs on."""
        return "mongodb" if self.mongodb_url else "sqlite"


def _host(address: str) -> str:
    """`host` of `host:port`, `[v6]:port` or a bare host."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    return address.partition(":")[0]


def _loopback_only(url: str) -> bool:
    """True when every host of `url` (MongoDB URLs may list several) is local."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    hosts = [_host(address).lower() for address in netloc.split(",") if address]
    return bool(hosts) and all(
        h in ("localhost", "::1") or h.startswith("127.") for h in hosts
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark a Baton gateway on RabbitMQ, against 127.0.0.1.",
    )
    add = parser.add_argument
    add("--scenario", choices=("all", *SCENARIOS), default="all")
    add("--seconds", type=float, default=20.0, help="measured seconds per run")
    add("--warmup", type=float, default=3.0, help="seconds before measuring")
    add("--workers", type=int, default=8, help="workers in the worker process")
    add(
        "--gateways",
        type=int,
        default=1,
        help="gateway processes for throughput and callback",
    )
    add("--batch", type=int, default=10, help="tasks per batch poll")
    add("--poll-timeout", type=int, default=100, help="batch poll timeout, ms")
    add("--starters", type=int, default=32, help="workflow starts in flight")
    add("--backlog", type=int, default=2000, help="most started, unfinished")
    add("--callback-ratio", type=float, default=0.2)
    add("--latency-tasks", type=int, default=500)
    add("--latency-rate", type=float, default=20.0, help="workflows/s")
    add("--latency-workers", type=int, default=4)
    add("--idle-polls", type=int, default=5000)
    add("--idle-seconds", type=float, default=10.0)
    add("--verify", type=int, default=1000, help="workflows to read back")
    add("--drain-timeout", type=float, default=60.0)
    add("--json", type=Path, default=None, help="also write figures here")
    add("--profile", type=Path, default=None, help="py-spy the throughput run")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line; exits with a usage message when it is wrong."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.batch < 1 or args.starters < 1:
        parser.error("--workers, --batch and --starters must be at least 1")
    if args.gateways < 1:
        parser.error("--gateways must be at least 1")
    if args.seconds <= 0 or args.latency_rate <= 0:
        parser.error("--seconds and --latency-rate must be positive")
    if not 0 <= args.callback_ratio <= 1:
        parser.error("--callback-ratio must be between 0 and 1")
    amqp_url = os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL
    mongodb_url = os.environ.get("MONGODB_URL") or None
    for name, url in (("AMQP_URL", amqp_url), ("MONGODB_URL", mongodb_url)):
        if url and not _loopback_only(url):
            parser.error(f"{name} must point at this machine (127.0.0.1)")
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    return Options(
        scenarios=scenarios,
        seconds=args.seconds,
        warmup=args.warmup,
        workers=args.workers,
        gateways=args.gateways,
        batch=args.batch,
        poll_timeout_ms=args.poll_timeout,
        starters=args.starters,
        backlog=max(0, args.backlog),
        callback_ratio=args.callback_ratio,
        latency_tasks=max(1, args.latency_tasks),
        latency_rate=args.latency_rate,
        latency_workers=max(1, args.latency_workers),
        idle_polls=max(1, args.idle_polls),
        idle_seconds=args.idle_seconds,
        verify=max(0, args.verify),
        drain_timeout=args.drain_timeout,
        amqp_url=amqp_url,
        mongodb_url=mongodb_url,
        json_path=args.json,
        profile_path=args.profile,
    )
