# CPU image for the retrieval service (and the offline CLI, used by compose's `build` profile).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ARTIFACTS_DIR=/artifacts \
    HF_HOME=/cache/huggingface

WORKDIR /srv

# CPU-only torch first, from PyTorch's CPU index, so the project install below does not pull the
# multi-GB CUDA build from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision

COPY pyproject.toml README.md constraints.txt ./
COPY scripts ./scripts
COPY clipsearch ./clipsearch
COPY app ./app
COPY offline ./offline
RUN pip install . && python -c "import app.main, offline.cli"

RUN useradd --create-home --uid 10001 clipsearch \
    && mkdir -p /artifacts /cache \
    && chown clipsearch:clipsearch /cache /artifacts
USER clipsearch

EXPOSE 8000
# Ready = model and indexes loaded (GET /readyz answers 200); the first load can take a minute.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"

CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "1"]
