# imagegate on NVIDIA GPUs. Build: `make image` (or `docker build -t imagegate:<version> .`).
# Run:   docker run --gpus all -p 8000:8000 -v models:/models -v cache:/cache -v data:/data \
#          -e IMAGEGATE_API_KEYS=... imagegate:<version> /models/sdxl-base-1.0
#
# The base image's CUDA torch is kept: the project is installed with torch pinned to the
# version already there, so pip never swaps it for a CPU wheel from PyPI.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/imagegate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY inference ./inference
COPY auth ./auth
COPY observability ./observability

RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
 && pip install -c /tmp/torch-constraint.txt . \
 && python -c "import sys, torch; want = open('/tmp/torch-constraint.txt').read().strip(); got = 'torch==' + torch.__version__; sys.exit(0 if got == want and torch.version.cuda else 'base torch replaced: ' + got + ' (wanted ' + want + ' with CUDA)')" \
 && rm /tmp/torch-constraint.txt \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/imagegate imagegate \
 && mkdir -p /models /cache /data \
 && chown imagegate:imagegate /models /cache /data

# /models: weights you mount (serve /models/<folder>). /cache: the built-in model, the Hugging
# Face hub cache and the torch.compile cache. /data: URL-mode media, task store, usage ledger.
ENV IMAGEGATE_HOST=0.0.0.0 \
    IMAGEGATE_PORT=8000 \
    IMAGEGATE_CACHE_DIR=/cache \
    IMAGEGATE_DATA_DIR=/data \
    HF_HOME=/cache/huggingface
VOLUME ["/models", "/cache", "/data"]
EXPOSE 8000

USER 10001:10001

# /ready answers 200 only when loaded, warmed and not draining; urlopen raises (exit 1) on a 503.
# Loading and compiling SDXL can take minutes; failures inside the start period do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('IMAGEGATE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["imagegate", "serve"]
