# replicator: continuous backup of SQLite databases (see README "Deploy").
#   docker build -t replicator .
#   docker run -v app-data:/data -v ./replicator.yml:/etc/replicator/replicator.yml:ro replicator
# Build stage: the wheels of replicator and of its dependencies. Runtime stage: the same slim
# Python, the wheels installed from a bind mount (no compiler, no wheel files left behind).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY replicator ./replicator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
# the version in pyproject.toml (a test keeps them equal)
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="replicator" \
      org.opencontainers.image.description="Continuous backup and point-in-time recovery for SQLite" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REPLICATOR_CONFIG=/etc/replicator/replicator.yml
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "replicator==${VERSION}"
COPY deploy/docker/healthcheck.py /usr/local/lib/replicator/healthcheck.py
# never root: the database directory must be writable by this uid (SQLite's -shm file and the
# spool live there); a volume mounted at /data starts out owned by it
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin replicator \
    && mkdir -p /data /etc/replicator \
    && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
EXPOSE 9090
# SIGTERM: a final sync within shutdown-timeout, then exit (the replicator handles it as PID 1;
# with --exec, run the image with an init, e.g. `docker run --init`, so orphans are reaped)
STOPSIGNAL SIGTERM
# asks /healthz at the config's metrics-addr; passes when the config sets none
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/usr/local/lib/replicator/healthcheck.py"]
ENTRYPOINT ["replicator"]
CMD ["replicate", "--config", "/etc/replicator/replicator.yml"]
