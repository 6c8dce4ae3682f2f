"""Baton's benchmark: throughput, latency, idle long polls and callbacks.

`python -m bench` starts a gateway on RabbitMQ (and SQLite, or MongoDB when
`MONGODB_URL` is set), drives it from separate worker and starter
processes that speak Conductor's task-worker API exactly as the SDKs do,
and prints what it measured. Everything runs against 127.0.0.1, is
bounded in time, and is cleaned up on exit. Other `BATON_*` variables in
the environment reach the gateway, so server settings can be varied per
run (e.g. `BATON_PREFETCH`).
"""
