# syntax=docker/dockerfile:1
# GSP retrieval service and jobs. One Dockerfile, two targets chosen by a build argument:
#   docker build --build-arg TARGET=cpu  -t gsp:cpu  .   # torch CPU wheels, faiss-cpu
#   docker build --build-arg TARGET=cuda -t gsp:cuda .   # CUDA base, torch CUDA, faiss GPU
# Nothing is downloaded at build time beyond packages: the EfficientNet-Lite0 ImageNet weights
# ship inside a pip package; checkpoints and galleries are mounted at run time.
ARG TARGET=cpu

# ---- Python bases, one per target ---------------------------------------------------------
FROM python:3.11-slim-bookworm AS python-cpu
ENV PIP_INDEX_EXTRA=https://download.pytorch.org/whl/cpu

# The CUDA libraries themselves come as pip wheels with torch and faiss-gpu-cu12, so the small
# CUDA base image (driver integration, NVIDIA_* settings) is enough.
FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS python-cuda
ENV PIP_INDEX_EXTRA=""
# Ubuntu's python3 follows the base image's release; pinning its patch version only breaks builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# ---- build the virtual environment --------------------------------------------------------
# python-${TARGET} is one of the stages above (hadolint reads it as an untagged image).
# hadolint ignore=DL3006
FROM python-${TARGET} AS builder
ARG TARGET
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/requirements.py
RUN python docker/requirements.py "${TARGET}" > /tmp/requirements.txt \
    && pip install ${PIP_INDEX_EXTRA:+--extra-index-url "$PIP_INDEX_EXTRA"} -r /tmp/requirements.txt
COPY model model
COPY index index
COPY app app
RUN pip install --no-deps . && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

# ---- runtime: the venv, a non-root user, nothing else ---------------------------------------
# hadolint ignore=DL3006
FROM python-${TARGET} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GSP_CHECKPOINT=/models/current \
    GSP_GALLERY=/data/gallery
COPY --from=builder /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/gsp-entrypoint
COPY docker/healthcheck.py docker/reload.py /usr/local/lib/gsp/
COPY docker/reindex.sh /usr/local/bin/gsp-reindex
RUN useradd --create-home --uid 10001 --user-group gsp \
    && mkdir -p /models /data/gallery /images \
    && chown -R gsp:gsp /models /data
USER 10001:10001
WORKDIR /home/gsp
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/gsp/healthcheck.py"]
ENTRYPOINT ["gsp-entrypoint"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
