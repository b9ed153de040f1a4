# CAMEx Serve image: the HTTP server with CPU torch and the demo checkpoints baked in.
#
#   docker build -t camex-server .
#   # with an API key (the default command refuses to serve without one, see CMD below):
#   docker run -p 127.0.0.1:8080:8080 -e CAMEX_API_KEY="$(openssl rand -hex 32)" camex-server
#   # or from a file (not visible in `docker inspect`):
#   docker run -p 127.0.0.1:8080:8080 -v "$PWD/key:/run/secrets/camex-key:ro" \
#       -e CAMEX_API_KEY_FILE=/run/secrets/camex-key camex-server
#   # a trusted machine, no key: say so explicitly
#   docker run -p 127.0.0.1:8080:8080 camex-server --allow-unauthenticated
#   # your own models
#   docker run -p 127.0.0.1:8080:8080 -v /my/models:/models:ro -e CAMEX_API_KEY=... \
#       -e CAMEX_MODEL=/models/lm -e CAMEX_CLASSIFIER=/models/clf camex-server
#
# `-p 127.0.0.1:8080:8080` publishes on the host's loopback only; `-p 8080:8080` would publish
# on every host interface.
#
# Build args:
#   TORCH_VARIANT  cpu (default) or a CUDA wheel tag such as cu128; run a CUDA image with
#                  `--gpus all -e CAMEX_DEVICE=cuda`. The python:3.11 base is enough: the CUDA
#                  wheels carry their own CUDA runtime libraries.
#   TORCH_INDEX_URL, TORCH_FIND_LINKS  where torch comes from (default: the PyTorch index of
#                  TORCH_VARIANT; find-links adds a local wheel directory).
#   BASE           base image with python3.11 + venv (deploy/build_image.sh passes a locally
#                  bootstrapped Debian image when no registry can be reached).
#   BAKE_DEMO      1 (default) trains and exports the demo checkpoints at build time; 0 skips it
#                  (then mount a model and set CAMEX_MODEL).
ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- builder
FROM ${BASE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# A directory of local torch wheels, e.g. mounted with `buildah build -v /opt/wheels:/wheels`
# (deploy/build_image.sh does this where download.pytorch.org cannot be reached).
ARG TORCH_FIND_LINKS=""
# torch is pinned (TORCH_VERSION); hadolint reads the optional --find-links value as a package.
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL" \
        ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"}

# Declared after the torch layer so that toggling it keeps that (large) layer cached.
ARG BAKE_DEMO=1
# The demo trains on Debian's fortune cookies. Versions are not pinned: the package only
# supplies text and comes from the base image's own suite.
# hadolint ignore=DL3008
RUN if [ "$BAKE_DEMO" = "1" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends fortunes \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY camex_runtime ./camex_runtime
COPY server ./server
COPY loadtest ./loadtest
# torch is already satisfied by the variant above (2.13.0+cpu matches the ==2.13.0 pin).
RUN pip install .

# The native CPU decode kernels (camex_runtime/kernels), compiled once here, from the installed
# package (`-P`: not the sources in the working directory), so that the runtime image needs no
# compiler and a container never compiles at start-up (without them it would serve with
# torch's slower kernels). x86-64 only: they use
# AVX2/FMA/F16C, and pick AVX-512 at run time where the serving CPU has it. Python's headers
# come with the python image; a Debian-python base (deploy/build_image.sh) needs python3-dev.
ENV CAMEX_KERNELS_DIR=/opt/camex/kernels
# hadolint ignore=DL3008
RUN mkdir -p "$CAMEX_KERNELS_DIR" \
    && if [ "$(uname -m)" = "x86_64" ]; then \
        headers="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
        && apt-get update \
        && apt-get install -y --no-install-recommends g++ \
        && if [ ! -f "$headers/Python.h" ]; then \
            apt-get install -y --no-install-recommends python3-dev; \
        fi \
        && rm -rf /var/lib/apt/lists/* \
        && python -P -m camex_runtime.kernels; \
    fi

# Only the folded checkpoints are served; the training runs (optimizer state, curves) stay behind.
ENV CAMEX_DEMO_DIR=/opt/camex/demo
RUN mkdir -p "$CAMEX_DEMO_DIR" \
    && if [ "$BAKE_DEMO" = "1" ]; then \
        python -m camex_runtime.training.demo --root "$CAMEX_DEMO_DIR" \
        && rm -rf "$CAMEX_DEMO_DIR/runs"; \
    fi

# ---------------------------------------------------------------------------- runtime
FROM ${BASE} AS runtime
LABEL org.opencontainers.image.title="camex-server" \
      org.opencontainers.image.description="Serve CAMEx merged-expert language models" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --gid 10001 camex \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/camex \
        --shell /usr/sbin/nologin camex

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/camex/kernels /opt/camex/kernels
# The trainer writes owner-only files; the server user must be able to read them.
COPY --from=builder --chown=10001:10001 /opt/camex/demo /opt/camex/demo

# CAMEX_HOST=0.0.0.0: inside a container the server must listen on the container's interface.
# With CAMEX_MODEL unset the server serves the demo checkpoints found under CAMEX_DEMO_DIR.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CAMEX_DEMO_DIR=/opt/camex/demo \
    CAMEX_KERNELS_DIR=/opt/camex/kernels \
    CAMEX_HOST=0.0.0.0 \
    CAMEX_PORT=8080 \
    HF_HOME=/home/camex/.cache/huggingface

USER 10001:10001
WORKDIR /home/camex
EXPOSE 8080

# /health is 200 only while the engine loop really runs (no curl in the image: python urllib).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CAMEX_PORT', '8080') + '/health', timeout=4)"]

ENTRYPOINT ["camex-server"]
# The default command passes nothing: on the container's 0.0.0.0 the server then starts only
# with an API key (CAMEX_API_KEY or CAMEX_API_KEY_FILE) and otherwise exits at once saying so.
# Serving without a key takes an explicit `--allow-unauthenticated` (or
# CAMEX_ALLOW_UNAUTHENTICATED=1).
CMD []
