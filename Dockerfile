# The meddpm-deploy application image: `python -m app` on HOLOSCAN_INPUT_PATH -> HOLOSCAN_OUTPUT_PATH with the
# exported model repository at HOLOSCAN_MODEL_PATH (mounted read-only: the same folder Triton serves).
#
# Every Python package comes from a wheelhouse (scripts/wheelhouse.sh), never from a registry during the build,
# so the same Dockerfile builds on an air-gapped site. The default base is the CUDA runtime image a GPU site
# uses; scripts/container_check.sh builds it here on a stand-in: Debian 12 from debootstrap plus the CUDA runtime
# library. The wheelhouse must be made for the base's Python (PYTHON_VERSION): 3.12 on Ubuntu 24.04, 3.11 on
# Debian 12. The root filesystem may be read-only: the app writes only to its output and /tmp.
ARG BASE_IMAGE=nvcr.io/nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS python
ARG PYTHON_VERSION=3.12
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "python3=${PYTHON_VERSION}.*" \
    && rm -rf /var/lib/apt/lists/*

# Build stage: a virtual environment filled from the wheelhouse; pip, the venv module and the wheels stay here.
FROM python AS build
ARG PYTHON_VERSION=3.12
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "python3-venv=${PYTHON_VERSION}.*" \
    && rm -rf /var/lib/apt/lists/*
COPY build/wheelhouse /wheelhouse
# torch first, pinned to the CPU build in the wheelhouse (the schedulers run on the CPU; the UNet runs in
# ONNX Runtime or on Triton), then the pinned requirements and the project itself.
RUN python3 -m venv /opt/meddpm \
    && /opt/meddpm/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse torch==2.13.0 \
    && /opt/meddpm/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse -r /wheelhouse/requirements.txt
COPY pyproject.toml README.md /src/
COPY meddpm /src/meddpm
COPY export /src/export
COPY app /src/app
RUN /opt/meddpm/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse --no-deps /src \
    && /opt/meddpm/bin/pip check

# Final stage: the base, Python and the environment; no compiler, no apt lists, no wheelhouse, no sources.
FROM python AS app
ARG APP_UID=10001
RUN useradd --uid "${APP_UID}" --user-group --create-home --home-dir /home/meddpm --shell /usr/sbin/nologin meddpm \
    && mkdir -p /var/holoscan/input /var/holoscan/output /var/holoscan/logs /opt/holoscan/models \
    && chown -R meddpm:meddpm /var/holoscan
COPY --from=build /opt/meddpm /opt/meddpm
# The MONAI Deploy SDK's settings, at the paths a MAP uses; TRITON_SERVER_NETLOC unset runs the UNet in process.
ENV PATH=/opt/meddpm/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOLOSCAN_INPUT_PATH=/var/holoscan/input \
    HOLOSCAN_OUTPUT_PATH=/var/holoscan/output \
    HOLOSCAN_MODEL_PATH=/opt/holoscan/models \
    HOLOSCAN_WORKDIR=/var/holoscan \
    HOLOSCAN_LOGS_PATH=/var/holoscan/logs \
    HOLOSCAN_LOG_LEVEL=WARN \
    CUPY_CACHE_DIR=/tmp/cupy
USER ${APP_UID}:${APP_UID}
WORKDIR /var/holoscan
ENTRYPOINT ["python", "-m", "app"]
