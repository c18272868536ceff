# syntax=docker/dockerfile:1
# GSP retrieval service and jobs. One Dockerfile, two targets chosen by a build argument:
#   docker build --build-arg TARGET=cpu  -t gsp-retrieval:cpu  .   # CPU torch (PyTorch CPU index)
#   docker build --build-arg TARGET=cuda -t gsp-retrieval:cuda .   # PyPI's CUDA 13 torch
# Both use faiss-cpu for search: torch's CUDA wheels bring their own CUDA libraries, and no faiss
# GPU build for CUDA 13 is on PyPI, so the CUDA image has one CUDA stack (docs/containers.md).
# BASE_IMAGE is any Debian bookworm image: the official Python image by default, or a plain
# Debian image (Debian's python3 is then installed), as on machines that cannot pull images.
# Nothing is downloaded at run time: the EfficientNet-Lite0 ImageNet weights ship inside a pip
# package; checkpoints and galleries are mounted.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG TARGET=cpu

# ---- the Python interpreter, shared by the build and runtime stages ------------------------
FROM ${BASE_IMAGE} AS python
# Debian's python3 follows the release; pinning its patch version only breaks builds.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    fi

# ---- the requirements file: its own stage, so that only a change of the dependencies (not of
# pyproject.toml's other sections or of README.md) reinstalls them. It holds all that differs
# between the targets (docker/requirements.py) ---------------------------------------------------
FROM python AS requirements
ARG TARGET
# Where the CPU target takes torch from; empty: the package index's torch (a CUDA build, which
# also runs on a CPU but is about 5 GB larger).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras, comma-separated: EXTRAS=ray for the nodes and driver of a Ray cluster
# (docker-compose.ray.yml); the default image has none.
ARG EXTRAS=""
COPY pyproject.toml docker/requirements.py /src/
RUN python3 /src/requirements.py /src/pyproject.toml "$TARGET" "$TORCH_INDEX_URL" "$EXTRAS" \
    > /requirements.txt

# ---- the virtual environment with the dependencies ------------------------------------------
FROM python AS venv
# pip's own settings, for a private mirror or local wheel folders, and a CA bundle for pip and
# uv behind a TLS-inspecting proxy (docker/pip_build_args.py passes the host's).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
ARG SSL_CERT_FILE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_NO_CACHE=1
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY tools/install.py tools/install.py
COPY --from=requirements /requirements.txt /tmp/requirements.txt
# Dependencies first (a layer that code changes do not invalidate), through uv with pip's
# settings (tools/install.py), bytecode compiled: the user cannot write .pyc files at run time.
RUN python tools/install.py -r /tmp/requirements.txt \
    && python -m pip uninstall --yes --quiet uv

# ---- the project as a wheel: installed in its own small layer, so that a code change does not
# copy the dependencies' gigabytes again -----------------------------------------------------------
FROM venv AS package
COPY pyproject.toml README.md ./
COPY model model
COPY index index
COPY app app
RUN python -m pip wheel --no-deps --no-build-isolation --quiet --wheel-dir /wheel .

# ---- runtime: the interpreter, the venv and a non-root user -------------------------------
FROM python AS runtime
# NVIDIA_*: what the NVIDIA container runtime reads to give a container the GPU (the CUDA
# libraries come with torch); without that runtime, as for the CPU image, nothing reads them.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GSP_CHECKPOINT=/models/current \
    GSP_GALLERY=/data/gallery
RUN useradd --create-home --uid 10001 --user-group gsp \
    && mkdir -p /models /data/gallery /data/published /images \
    && chown -R gsp:gsp /models /data
COPY --from=venv /opt/venv /opt/venv
RUN --mount=type=bind,from=package,source=/wheel,target=/tmp/wheel \
    pip install --no-deps --no-cache-dir --disable-pip-version-check --quiet /tmp/wheel/*.whl
COPY docker/entrypoint.sh /usr/local/bin/gsp-entrypoint
COPY docker/healthcheck.py docker/reload.py /usr/local/lib/gsp/
COPY docker/reindex.sh /usr/local/bin/gsp-reindex
COPY docker/preflight.py /usr/local/bin/gsp-preflight
# On a GPU, Triton (torch.compile's kernels, GSP_KERNEL=triton) compiles its CUDA launchers at
# run time with a C compiler and Python's headers: the CUDA image has them, the CPU image, which
# never compiles, does not. Declared this late, TARGET leaves the layers above shared.
ARG TARGET
# $packages is a list of words on purpose.
# hadolint ignore=DL3008,SC2086
RUN if [ "$TARGET" = cuda ]; then \
        headers="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
        && packages="gcc libc6-dev" \
        && if [ ! -e "$headers/Python.h" ]; then packages="$packages python3-dev"; fi \
        && apt-get update \
        && apt-get install -y --no-install-recommends $packages \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    fi
USER 10001:10001
WORKDIR /home/gsp
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/gsp/healthcheck.py"]
ENTRYPOINT ["gsp-entrypoint"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
