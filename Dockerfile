# One image for the API and the worker; they differ by command (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FACEGRAD_DATA_DIR=/data FACEGRAD_HOST=0.0.0.0 FACEGRAD_PORT=8000

RUN apt-get update && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY facegrad ./facegrad
COPY app ./app
COPY worker ./worker
# torch==2.13.0 from PyPI is the CUDA build on x86_64: the same image serves GPU workers.
RUN pip install ".[postgres]"

RUN useradd --create-home --uid 10001 facegrad && mkdir -p /data && chown facegrad /data
USER facegrad
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; \
    sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)" || exit 1
CMD ["facegrad", "serve"]
