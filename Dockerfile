# llm-usage-exporter container image.
#   docker build -t llm-usage-exporter .
#   docker run -p 9470:9470 -v llm-usage-data:/data \
#     -e LLM_USAGE_TOKENS='[{"name":"ops","token":"<16+ chars>","scopes":["admin"]}]' \
#     llm-usage-exporter
# Binding 0.0.0.0 (the CMD below) with no token configured is refused unless
# LLM_USAGE_INSECURE=true. See docs/stack.md.

# ---- build: the project and its dependencies in a virtualenv -------------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN /opt/venv/bin/pip install --no-cache-dir .

# ---- runtime: the virtualenv only (no sources, no pip cache), not root ---------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LLM_USAGE_DATA_DIR=/data \
    LLM_USAGE_PORT=9470
RUN groupadd --system --gid 10001 exporter \
 && useradd --system --uid 10001 --gid exporter --home-dir /data --shell /usr/sbin/nologin exporter \
 && mkdir -p /data \
 && chown exporter:exporter /data
COPY --from=build /opt/venv /opt/venv
USER exporter
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9470
# No curl in the slim image: probe /healthz with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLM_USAGE_PORT', '9470'), timeout=4)"]
ENTRYPOINT ["llm-usage-exporter"]
CMD ["serve", "--host", "0.0.0.0"]
