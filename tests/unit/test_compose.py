"""docker-compose.yml is for users (Docker does not run here): check it parses and
that every command it runs exists in this project."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_parses_and_references_real_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "worker", "producer"} <= set(services)
    worker = services["worker"]["command"]
    assert worker[:3] == ["celery", "-A", "examples.mailapp"]
    assert "-B" in worker
    assert (ROOT / "examples" / "mailapp.py").is_file()
    producer = " ".join(services["producer"]["command"])
    assert "queuetopia-celery migrate" in producer
    assert "python -m examples.mailapp produce" in producer
    for name in ("worker", "producer"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["BROKER_URL"].startswith("redis://redis:")
        assert services[name]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'queuetopia-celery = "queuetopia_celery.cli:main"' in pyproject
