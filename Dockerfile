# syntax=docker/dockerfile:1
# One image for the API and the workers; they differ only in their command (see docker-compose.yml).
# torch 2.14.1 from the package index is a CUDA build: it uses the host's NVIDIA driver through the NVIDIA
# container runtime and runs on the CPU without it.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# The heavy, rarely changing layer first, so code changes do not reinstall torch.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Flower (to watch the queue) is pinned like torch; the project itself is the local checkout, with the MLflow
# client so that KDISTILL_MLFLOW_TRACKING_URI works (--build-arg KDISTILL_EXTRAS=mlflow,timm adds timm students).
ARG KDISTILL_EXTRAS=mlflow
RUN pip install --no-cache-dir "/src[${KDISTILL_EXTRAS}]" flower==2.2.0

FROM python:3.11-slim-bookworm AS runtime
ARG UID=10001
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    KDISTILL_DATA_DIR=/data KDISTILL_LOG_FORMAT=json
# torch's wheel carries its own OpenMP and CUDA libraries: no system packages are needed.
RUN useradd --create-home --uid "${UID}" --shell /usr/sbin/nologin kdistill \
    && mkdir -p /data && chown kdistill:kdistill /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv/kdistill
COPY --chown=kdistill:kdistill alembic.ini ./
COPY --chown=kdistill:kdistill migrations ./migrations
USER ${UID}
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["uvicorn", "--factory", "app.main:app_factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
