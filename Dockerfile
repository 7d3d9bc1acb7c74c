FROM python:3.11-slim
# The package is installed from /src (as in the README: pip install .); /app holds only
# the example that docker-compose.yml runs, so the installed package is the one used.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY queuetopia_celery ./queuetopia_celery
COPY migrations ./migrations
RUN pip install --no-cache-dir .
WORKDIR /app
COPY examples ./examples
