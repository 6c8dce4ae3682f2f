# syntax=docker/dockerfile:1
# One image, two services:
#   gateway   (default)  python -m services.gateway    -> BATON_PORT, default 8080
#   scheduler            python -m services.scheduler  -> BATON_SCHEDULER_PORT, default 8081
# Configuration is environment only (see shared/config.py).
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# Non-editable install of the project and its pinned runtime dependencies
# into a self-contained virtual environment.
RUN python -m venv /opt/baton \
    && /opt/baton/bin/pip install . \
    && rm -rf /src

FROM python:3.11-slim

ENV PATH=/opt/baton/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BATON_HOST=0.0.0.0 \
    BATON_PORT=8080 \
    BATON_SCHEDULER_PORT=8081 \
    BATON_SQLITE_PATH=/data/baton.db

RUN groupadd --system --gid 10001 baton \
    && useradd --system --uid 10001 --gid baton --home-dir /data --shell /usr/sbin/nologin baton \
    && mkdir -p /data \
    && chown baton:baton /data

COPY --from=build /opt/baton /opt/baton

USER 10001:10001
WORKDIR /data
EXPOSE 8080 8081

# SIGTERM starts Baton's graceful shutdown (BATON_SHUTDOWN_GRACE_SECONDS).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "services.gateway"]
