# syntax=docker/dockerfile:1
# The edge daemon: `tandem edge serve` (llama.cpp behind the OpenAI API), installed as
# `tandem-mesh[edge]` from a wheel built from this checkout. No vLLM, no torch.
# The same image carries the tandem CLI for operator Jobs (the hybrid overlay's policy
# loader runs `tandem policy set` in it).
#
# NOT BUILT HERE: these machines have no container runtime and no image registry. The
# tests (tests/deploy/test_docker.py) parse and lint this file; build it where Docker
# or BuildKit runs, from the repository root:
#   docker build -f deploy/docker/edge.Dockerfile -t tandem-edge:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# llama-cpp-python compiles llama.cpp from source. GGML_NATIVE=OFF: pip's default
# -march=native would make a binary for the build machine's CPU only.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF" \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The project's wheel (not an editable install), then wheels for the edge extra.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --wheel-dir /wheels "$(ls /wheels/tandem_mesh-*.whl)[edge]"

FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TANDEM_HOME=/var/lib/tandem \
    TANDEM_EDGE_HOST=0.0.0.0 \
    TANDEM_EDGE_PORT=8080
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "tandem-mesh[edge]"
RUN groupadd --gid 1000 tandem \
 && useradd --uid 1000 --gid 1000 --home-dir /var/lib/tandem --create-home tandem
USER 1000:1000
WORKDIR /var/lib/tandem
EXPOSE 8080
# /health answers once the engine is loaded (the bundled model loads in well under a
# second; a big GGUF takes longer, hence the start period).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['TANDEM_EDGE_PORT']}/health\", timeout=4)"]
ENTRYPOINT ["tandem"]
CMD ["edge", "serve"]
