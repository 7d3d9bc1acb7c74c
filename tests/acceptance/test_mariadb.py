"""The core's acceptance tests on MariaDB: real ``celery worker`` processes (prefork,
with beat) on the MariaDB backend. Ordering and blocking behind a failing job, retries
with backoff and failure hooks, soft and hard time limits, a worker child killed with
SIGKILL mid-job (its attempt recovered from the expired lease), kicks, hand-offs and the
caller's transaction: the same tests as on PostgreSQL (tests/acceptance/test_core.py),
with this module's database fixtures pointing at the session's MariaDB database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from queuetopia_celery import make_engine
from tests.acceptance.test_core import (
    test_a_failing_job_is_retried_with_backoff_blocks_only_its_queue_and_is_then_exhausted,
    test_timeouts_and_crashes_become_failed_attempts_and_never_overlap,
    test_without_beat_jobs_are_kicked_handed_off_and_join_the_callers_transaction,
)
from tests.conftest import _mariadb_url

pytestmark = pytest.mark.acceptance

__all__ = [
    "test_a_failing_job_is_retried_with_backoff_blocks_only_its_queue_and_is_then_exhausted",
    "test_timeouts_and_crashes_become_failed_attempts_and_never_overlap",
    "test_without_beat_jobs_are_kicked_handed_off_and_join_the_callers_transaction",
]


@pytest.fixture(scope="module")
def database_url() -> str:
    """The session's MariaDB database, in place of PostgreSQL for this module's tests
    (the workers, the producers and the checks all use it)."""
    return _mariadb_url()


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_the_tests_here_run_on_mariadb(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        version = conn.execute(sa.text("SELECT VERSION()")).scalar_one()
    assert "MariaDB" in version
