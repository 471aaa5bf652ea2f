# syntax=docker/dockerfile:1
# Cleanroom: one image for the API, the worker and the one-shot migration.
#
#   docker build -t cleanroom .                       # CPU (torch pins from PyPI)
#   docker build -t cleanroom-gpu \
#     --build-arg BASE_IMAGE=<a CUDA runtime image with Python 3.11+> \
#     --build-arg TORCH_VARIANT=cu128 .               # wheels from the PyTorch index
#
# TORCH_VARIANT=pypi (default) installs the plain `torch==… torchvision==…` pins; any
# other value (cpu, cu126, cu128, ...) selects that PyTorch wheel index.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# -- builder: a virtualenv with every dependency ----------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VARIANT=pypi
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN if [ "$TORCH_VARIANT" = "pypi" ]; then \
        pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    else \
        pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
            "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    fi
# The project's runtime dependencies, from pyproject.toml alone (cached until it changes).
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('torch==', 'torchvision=='))))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "setuptools>=68"

# -- runtime: slim, non-root ------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/var/lib/cleanroom
RUN groupadd --system --gid 10001 cleanroom \
 && useradd --system --uid 10001 --gid cleanroom --home-dir /home/cleanroom --create-home cleanroom \
 && mkdir -p /var/lib/cleanroom && chown cleanroom:cleanroom /var/lib/cleanroom
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY defense_core ./defense_core
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
RUN pip install --no-deps --no-build-isolation --no-cache-dir -e . && cleanroom --help >/dev/null
USER cleanroom
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--http", "api.http_protocol:ProblemH11Protocol"]
