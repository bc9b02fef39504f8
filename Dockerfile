# agi-bridge: FastAGI server that stops/starts NoojeeContact call recordings.
#
#   docker build -t agi-bridge .
#   docker run --rm agi-bridge --help
#   docker compose up          # the bridge plus a NoojeeContact simulator (docker-compose.yml;
#                              # `docker-compose up` with Compose v1)
#
# Every setting is an AGI_BRIDGE_* environment variable (or a key of the TOML file named by
# AGI_BRIDGE_CONFIG); `docker run --rm -e ... agi-bridge check-config` shows the effective values.
# Inside a container the FastAGI listener must leave loopback, so the image listens on 0.0.0.0
# and the bridge refuses to start until AGI_BRIDGE_ALLOW_CLIENTS says who may connect.
#
# Stopping takes up to shutdown_grace (20 s) plus 2 s for the spool's last flush. Plain
# `docker run` sends SIGKILL 10 s after SIGTERM: give it `docker run --stop-timeout 30`
# (docker-compose.yml sets `stop_grace_period: 30s`).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a self-contained virtualenv with the package and its `fast` extra ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/agi-bridge/venv
WORKDIR /src
# uvloop (the `fast` extra) and httptools ship manylinux wheels: no compiler needed.
COPY pyproject.toml README.md ./
COPY agi_bridge/ agi_bridge/
RUN /opt/agi-bridge/venv/bin/pip install ".[fast]" \
 && /opt/agi-bridge/venv/bin/pip uninstall --yes pip setuptools \
 && /opt/agi-bridge/venv/bin/agi-bridge version

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="agi-bridge" \
      org.opencontainers.image.description="FastAGI server that stops and starts NoojeeContact call recordings" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric uid/gid, so volume and secret-file ownership can be prepared on the host
# (chown 10001) and Kubernetes' runAsNonRoot can verify it. openssl (a dependency of
# ca-certificates in the base image) makes the compose simulator's certificate: fail the build
# here, not at `docker compose up`, should a base image ever drop it.
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/lib/agi-bridge --shell /usr/sbin/nologin agi-bridge \
 && install -d -o agi-bridge -g agi-bridge -m 0750 /var/lib/agi-bridge \
 && openssl version

COPY --from=build /opt/agi-bridge/venv /opt/agi-bridge/venv
COPY deploy/docker-healthcheck /usr/local/bin/agi-bridge-healthcheck

ENV PATH=/opt/agi-bridge/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGI_BRIDGE_DATA_DIR=/var/lib/agi-bridge \
    AGI_BRIDGE_LISTEN=0.0.0.0:4573 \
    AGI_BRIDGE_METRICS_LISTEN=0.0.0.0:9573

# The spool (SQLite): keep it on a volume so queued requests survive a container upgrade.
# An empty named volume takes this directory's owner (agi-bridge) when first mounted.
VOLUME ["/var/lib/agi-bridge"]
WORKDIR /var/lib/agi-bridge
USER 10001:10001

# 4573: FastAGI (Asterisk's default AGI port); 9573: /metrics, /healthz, /readyz.
EXPOSE 4573 9573

# /healthz on the metrics listener, with the stdlib (the slim image has no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/agi-bridge/venv/bin/python", "/usr/local/bin/agi-bridge-healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/agi-bridge/venv/bin/agi-bridge"]
CMD ["serve"]
