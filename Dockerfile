# syntax=docker/dockerfile:1
# imgworker: two targets from one file.
#   docker build -t imgworker:cpu .                       (the default target: cpu)
#   docker build -t imgworker:gpu --target gpu .          (TensorRT from PyPI; the host's NVIDIA driver
#                                                          comes in through the NVIDIA container toolkit)
#   podman build --format docker ...                      (podman's default OCI format drops HEALTHCHECK)
# BASE_IMAGE is any Debian-like image with python3 >= 3.11 and venv: python:3.12-slim by default, or
# NVIDIA's TensorRT container for the gpu target. The model and the sample photos are baked in at
# build time (an image that needs no network to start, on a read-only root); TensorRT plans are
# built per GPU on first start into the volume /var/lib/imgworker.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
RUN python3 -m venv /opt/imgworker
# the locked versions, hashes checked (scripts/lock.sh)
COPY requirements ./requirements
RUN /opt/imgworker/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile --require-hashes \
      -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY worker ./worker
# What the worker never runs leaves the virtualenv (about 110 MB): the libraries' own test suites,
# ONNX Runtime's model-conversion tools and its C library (the Python module does not load it),
# ONNX's reference evaluator, NumPy's Fortran wrapper generator and SIMD test module, Pillow's AVIF
# and font plugins (no AVIF is decoded, no text drawn) and, last, in each target's stage, the
# installers. No bytecode is kept either (--no-compile, 20 MB): compiling what a worker imports
# costs about 0.5 s at its start.
RUN /opt/imgworker/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile --no-deps \
      --no-build-isolation . \
 && /opt/imgworker/bin/python -m worker fetch-assets --assets-dir /opt/imgworker-assets \
 && rm -rf /opt/imgworker-assets/downloads \
 && cd /opt/imgworker/lib/python3*/site-packages \
 && rm -rf onnx/backend/test onnx/reference numpy/*/tests numpy/tests numpy/f2py numpy/_core/_simd.* \
           onnxruntime/transformers onnxruntime/quantization onnxruntime/tools onnxruntime/datasets \
           onnxruntime/capi/libonnxruntime.so.* PIL/_avif.* PIL/_imagingft.* pillow.libs/libavif-* \
           pillow.libs/libfreetype-* pillow.libs/libharfbuzz-* pillow.libs/libbrotli* \
 && find . -name __pycache__ -prune -exec rm -rf {} +

FROM build AS build-cpu
RUN /opt/imgworker/bin/pip uninstall --yes --quiet --disable-pip-version-check setuptools pip

FROM build AS build-gpu
RUN /opt/imgworker/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile --require-hashes \
      -r requirements/gpu.txt \
 && /opt/imgworker/bin/pip uninstall --yes --quiet --disable-pip-version-check setuptools pip

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="imgworker" \
      org.opencontainers.image.description="Redis-fed image inference worker: TensorRT optimization profiles as shape buckets" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --no-log-init --uid 10001 --home-dir /var/lib/imgworker --create-home imgworker
ENV PATH=/opt/imgworker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/imgworker \
    IMGWORKER_ASSETS_DIR=/opt/imgworker-assets \
    IMGWORKER_BACKEND__TENSORRT__PLAN_DIR=/var/lib/imgworker/plans \
    IMGWORKER_LOG_FORMAT=json \
    IMGWORKER_METRICS__PORT=9400
VOLUME /var/lib/imgworker
EXPOSE 9400
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('IMGWORKER_METRICS__PORT', '9400'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status != 200)"]
# exec form: the worker is PID 1's only child-free process and gets SIGTERM itself
ENTRYPOINT ["imgworker"]
CMD ["run"]

FROM runtime AS gpu
COPY --from=build-gpu /opt/imgworker /opt/imgworker
COPY --from=build /opt/imgworker-assets /opt/imgworker-assets
# video: the GPU's JPEG engines are visible in a container only with this driver capability
ENV IMGWORKER_BACKEND__KIND=tensorrt \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video
USER 10001

FROM runtime AS cpu
COPY --from=build-cpu /opt/imgworker /opt/imgworker
COPY --from=build /opt/imgworker-assets /opt/imgworker-assets
USER 10001
