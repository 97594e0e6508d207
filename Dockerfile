# replicator as a sidecar: mount the application's database directory and a config file.
#   docker run -v app-data:/data -v ./replicator.yml:/etc/replicator.yml:ro replicator
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY replicator ./replicator
RUN pip install --no-cache-dir . && rm -rf /src

# never root: the database directory must be writable by this uid (for -shm and the spool)
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin replicator
USER 10001:10001
WORKDIR /data

ENTRYPOINT ["replicator"]
CMD ["replicate", "--config", "/etc/replicator.yml"]
