# syntax=docker/dockerfile:1
#
# celery-events-exporter image.
#
#   docker build -t celery-events-exporter:0.1.0 .
#   docker run --rm -p 9808:9808 \
#     -e CELERY_EXPORTER_BROKER_URL=redis://:password@redis:6379/0 \
#     celery-events-exporter:0.1.0
#
# Two stages: the builder installs the package (as the README does, with
# `pip install .`, plus extras) into a virtualenv at /opt/venv; the final stage
# copies only that virtualenv onto a fresh python:3.11-slim and runs it as an
# unprivileged user (uid/gid 10001, the uid the Helm chart runs it as).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# msgpack: the msgpack event serializer; tracing: OTLP trace export (otlp_traces).
ARG EXTRAS=msgpack,tracing

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the build needs (see .dockerignore): the metadata first, then the code.
COPY pyproject.toml README.md ./
COPY exporter ./exporter

# Build the wheel, then install it with its extras into the virtualenv
# (pip compiles the .py files to .pyc here, so the read-only image needs no writes).
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install "$(ls /wheels/celery_events_exporter-*.whl)[${EXTRAS}]" \
 && test -x /opt/venv/bin/celery-events-exporter \
 && python -c "import exporter; print('celery-events-exporter', exporter.__version__)"

# ---------------------------------------------------------------- final
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""

LABEL org.opencontainers.image.title="celery-events-exporter" \
      org.opencontainers.image.description="Prometheus exporter and trace builder for Celery's event stream" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --system --gid 10001 exporter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin exporter \
 && mkdir -p /etc/celery-events-exporter

COPY --from=builder /opt/venv /opt/venv

# Numeric so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /tmp

EXPOSE 9808

# /healthz answers 200 while the event loop is alive. No curl in the slim
# image: python's urllib does the request. Follows CELERY_EXPORTER_PORT when
# the port is changed by env (a port set only in a config file is not seen;
# Kubernetes ignores HEALTHCHECK and uses the chart's probes instead).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('CELERY_EXPORTER_PORT', '9808'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["celery-events-exporter"]
