"""queuetopia-celery: persistent, strictly ordered, blocking job queues for Celery.

Jobs live in PostgreSQL; each named queue runs one job at a time in FIFO order; a
failing job is retried with backoff and blocks only its own queue.
"""

from .app import Queuetopia, make_engine
from .errors import (
    ConfigurationError,
    DatabaseError,
    DoNotRetry,
    DuplicatePerformerError,
    InvalidJobError,
    JobNotFoundError,
    JobStateError,
    JobTimeoutError,
    NewerSchemaError,
    NoPerformerError,
    QueueNotFoundError,
    QueuetopiaError,
    ResultNotJSONError,
    SchemaMissingError,
    UnknownActionError,
    UnsupportedOptionError,
    WaitTimeoutError,
)
from .jobs import DrainResult, Job, JobState, NewJob, Page, QueueStatus, default_backoff
from .ordered_task import BoundOrderedTask, OrderedTask
from .performer import Performer

__all__ = [
    "BoundOrderedTask",
    "ConfigurationError",
    "DatabaseError",
    "DoNotRetry",
    "DrainResult",
    "DuplicatePerformerError",
    "InvalidJobError",
    "Job",
    "JobNotFoundError",
    "JobState",
    "JobStateError",
    "JobTimeoutError",
    "NewJob",
    "NewerSchemaError",
    "NoPerformerError",
    "OrderedTask",
    "Page",
    "Performer",
    "QueueNotFoundError",
    "QueueStatus",
    "Queuetopia",
    "QueuetopiaError",
    "ResultNotJSONError",
    "SchemaMissingError",
    "UnknownActionError",
    "UnsupportedOptionError",
    "WaitTimeoutError",
    "default_backoff",
    "make_engine",
]

__version__ = "0.1.0"
