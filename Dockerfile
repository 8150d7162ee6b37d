# syntax=docker/dockerfile:1
# Two targets: `cpu` (default: CPU torch + onnxruntime) and `gpu` (CUDA torch + onnxruntime-gpu).
#   docker build -t nccr-guard .                 # cpu
#   docker build --target gpu -t nccr-guard:gpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS cpu-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU wheel index, so nothing resolves a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# A C compiler for the one dependency without a wheel (webrtcvad, via resemblyzer); this stage is not shipped.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY service/nccr_guard/__init__.py service/nccr_guard/__init__.py
RUN pip install ".[cpu]" && pip uninstall -y nccr-guard

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS gpu-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY service/nccr_guard/__init__.py service/nccr_guard/__init__.py
# The gpu image is built on this stage: the compiler webrtcvad (via resemblyzer) needs leaves in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev python3.11-dev \
    && pip install ".[gpu]" && pip uninstall -y nccr-guard \
    && apt-get purge -y --auto-remove gcc libc6-dev python3.11-dev && rm -rf /var/lib/apt/lists/*

FROM ${PYTHON_IMAGE} AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 curl \
    && rm -rf /var/lib/apt/lists/* && useradd --uid 10001 --create-home guard
COPY --from=cpu-deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 NCCR_GUARD_HOST=0.0.0.0 NCCR_GUARD_PORT=8000
WORKDIR /app
COPY --chown=guard:guard . .
RUN pip install --no-cache-dir --no-deps . && python -c "import nccr_guard.cli"
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "s=http; [ -z \"$NCCR_GUARD_SSL_CERTFILE\" ] || s=https; curl -fsSk -o /dev/null $s://127.0.0.1:$NCCR_GUARD_PORT/v2/health/live"]
# Serves the default models under /app/models; NCCR_GUARD_MODELS / --models replaces them, NCCR_GUARD_ADD_MODEL /
# --add-model DIR serves one more beside them (e.g. a volume mounted at /models/mine).
ENTRYPOINT ["nccr-guard", "serve"]

FROM gpu-deps AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home guard
ENV PYTHONUNBUFFERED=1 NCCR_GUARD_HOST=0.0.0.0 NCCR_GUARD_PORT=8000 NCCR_GUARD_DEVICE=cuda
WORKDIR /app
COPY --chown=guard:guard . .
RUN pip install --no-cache-dir --no-deps . && python -c "import nccr_guard.cli"
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "s=http; [ -z \"$NCCR_GUARD_SSL_CERTFILE\" ] || s=https; curl -fsSk -o /dev/null $s://127.0.0.1:$NCCR_GUARD_PORT/v2/health/live"]
# Serves the default models under /app/models; NCCR_GUARD_MODELS / --models replaces them, NCCR_GUARD_ADD_MODEL /
# --add-model DIR serves one more beside them (e.g. a volume mounted at /models/mine).
ENTRYPOINT ["nccr-guard", "serve"]

# Default target last-but-named: `docker build .` builds `cpu`.
FROM cpu
