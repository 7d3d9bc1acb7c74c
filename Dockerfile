FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY queuetopia_celery ./queuetopia_celery
COPY examples ./examples
RUN pip install --no-cache-dir .
