"""queuetopia-celery: persistent, strictly ordered, blocking job queues for Celery.

Jobs live in PostgreSQL; each named queue runs one job at a time in FIFO order; a
failing job is retried with backoff and blocks only its own queue.
"""

from .app import Queuetopia, make_engine
from .errors import (
    ConfigurationError,
    DatabaseError,
    DuplicatePerformerError,
    InvalidJobError,
    JobNotFoundError,
    JobStateError,
    JobTimeoutError,
    NoPerformerError,
    QueueNotFoundError,
    QueuetopiaError,
    ResultNotJSONError,
)
from .jobs import DrainResult, Job, JobState, NewJob, Page, QueueStatus, default_backoff
from .performer import Performer

__all__ = [
    "ConfigurationError",
    "DatabaseError",
    "DrainResult",
    "DuplicatePerformerError",
    "InvalidJobError",
    "Job",
    "JobNotFoundError",
    "JobState",
    "JobStateError",
    "JobTimeoutError",
    "NewJob",
    "NoPerformerError",
    "Page",
    "Performer",
    "QueueNotFoundError",
    "QueueStatus",
    "Queuetopia",
    "QueuetopiaError",
    "ResultNotJSONError",
    "default_backoff",
    "make_engine",
]

__version__ = "0.1.0"
