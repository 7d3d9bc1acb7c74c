"""The exceptions queuetopia-celery raises.

Every exception derives from :class:`QueuetopiaError`. Each class says when it is
raised; the data it is about is kept in attributes, not only in the message.
"""

from __future__ import annotations


class QueuetopiaError(Exception):
    """Root of every error raised by queuetopia-celery."""


class InvalidJobError(QueuetopiaError, ValueError):
    """Raised when ``create_job`` (or another call) gets input it cannot accept.

    Nothing is written when it is raised. ``field`` names the offending argument
    and ``reason`` says what is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")


class UnknownActionError(InvalidJobError):
    """Raised when ``create_job`` or ``create_jobs`` gets an action that no performer of
    the creating Queuetopia handles, while that Queuetopia has performers registered
    (a job nobody can run would block its queue for all its attempts).

    Nothing is written. ``scope``, ``action`` and ``known`` (the registered actions)
    say which. A producer that does not register the workers' performers builds its
    Queuetopia with ``check_actions=False``.
    """

    def __init__(self, scope: str, action: str, known: list[str]) -> None:
        self.scope = scope
        self.action = action
        self.known = known
        super().__init__(
            "action",
            f"no performer handles {action!r} in scope {scope!r} (registered: {', '.join(known)}); "
            "register one, or build this producer's Queuetopia with check_actions=False",
        )


class ConfigurationError(QueuetopiaError, ValueError):
    """Raised when a :class:`~queuetopia_celery.Queuetopia` is built with options
    that cannot work together (no database, an unknown option value, ...)."""


class DuplicatePerformerError(ConfigurationError):
    """Raised when two performers are registered for one action in one scope."""

    def __init__(self, scope: str, action: str) -> None:
        self.scope = scope
        self.action = action
        super().__init__(f"a performer for action {action!r} is already registered in scope {scope!r}")


class NoPerformerError(QueuetopiaError, LookupError):
    """Raised (and recorded as the job's error) when a worker runs a job whose
    action has no performer in that worker's registry."""

    def __init__(self, scope: str, action: str) -> None:
        self.scope = scope
        self.action = action
        super().__init__(
            f"no performer registered for action {action!r} in scope {scope!r}; "
            "the job stays at the head of its queue and is retried"
        )


class JobTimeoutError(QueuetopiaError):
    """Raised inside a running performer when its job exceeds ``timeout`` seconds.

    The attempt is recorded as failed with this error and retried with backoff.
    """

    def __init__(self, job_id: int, timeout: float) -> None:
        self.job_id = job_id
        self.timeout = timeout
        super().__init__(f"job {job_id} timed out after {timeout:g} s")


class ResultNotJSONError(QueuetopiaError, TypeError):
    """Raised (and recorded as the job's error) when a performer returns a value
    that cannot be stored as JSON."""


class JobNotFoundError(QueuetopiaError, LookupError):
    """Raised when an operation names a job id that does not exist in this scope."""

    def __init__(self, scope: str, job_id: int) -> None:
        self.scope = scope
        self.job_id = job_id
        super().__init__(f"no job {job_id} in scope {scope!r}")


class DatabaseError(QueuetopiaError):
    """Raised when the database cannot be reached or refuses a statement.

    The driver's exception is chained as ``__cause__``; the message never contains
    the database password. ``connection_lost`` is True when the connection itself
    was found dead (a server restart, a terminated backend).
    """

    def __init__(self, message: str, *, connection_lost: bool = False) -> None:
        super().__init__(message)
        self.connection_lost = connection_lost


class NewerSchemaError(DatabaseError):
    """Raised by ``migrate`` when the database's queuetopia tables were migrated by a
    newer queuetopia-celery than this one: this version cannot tell what its steps
    would do to them. Upgrade the package (or downgrade the tables with the newer
    version's ``migrate``). ``version`` is the tables' version, ``newest`` this
    package's newest."""

    def __init__(self, version: str, newest: str) -> None:
        self.version = version
        self.newest = newest
        super().__init__(
            f"the queuetopia tables in this database are at version {version}, newer than this "
            f"queuetopia-celery knows (its newest is {newest}): upgrade queuetopia-celery "
            "on this machine, or run the newer version's migrate"
        )


class SchemaMissingError(DatabaseError):
    """Raised when the queuetopia tables are missing from the database, or older than
    this version of queuetopia-celery: run ``queuetopia-celery migrate`` (or
    ``Queuetopia.migrate()``). ``database`` is the database URL, without its password."""

    def __init__(self, database: str) -> None:
        self.database = database
        super().__init__(
            "the queuetopia tables are missing or out of date in this database: "
            f"run `queuetopia-celery migrate --database-url {database}`"
        )


class JobStateError(QueuetopiaError):
    """Raised when an operator action (``retry_job``, ``abort_job``) does not apply to
    the job in its current state: ``job_id``, ``state`` (what it is) and ``action``
    (what was asked) say which."""

    def __init__(self, job_id: int, state: str, action: str, hint: str = "") -> None:
        self.job_id = job_id
        self.state = state
        self.action = action
        message = f"cannot {action} job {job_id}: it is {state}"
        super().__init__(f"{message}; {hint}" if hint else message)


class UnsupportedOptionError(InvalidJobError):
    """Raised when an ordered task (``@qt.task``) is given a Celery option that has no
    meaning for ordered jobs (``link``, ``priority``, ``expires``, ...): ``field`` names
    the option and ``reason`` says what to do instead. Nothing is written."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.args = (f"option {field!r} {reason}",)


class DoNotRetry(QueuetopiaError):
    """Raise it from a performer to end its job now, without further attempts: the job
    is recorded as failed for good (exhausted, or held with ``on_exhausted="hold"``)
    with this error, and its queue moves on (or stays held). Raised for you by an
    ordered task with ``autoretry_for=`` when another exception escapes it; chain the
    cause (``raise DoNotRetry(...) from exc``) to keep its traceback in the job's error."""


class WaitTimeoutError(QueuetopiaError, TimeoutError):
    """Raised by :meth:`Queuetopia.wait` when the job has not reached an outcome (done,
    exhausted, aborted, held) within ``timeout`` seconds: ``job_id``, ``state`` (as last
    read) and ``timeout`` say which."""

    def __init__(self, job_id: int, state: str, timeout: float) -> None:
        self.job_id = job_id
        self.state = state
        self.timeout = timeout
        super().__init__(f"job {job_id} is still {state} after {timeout:g} s")


class QueueNotFoundError(QueuetopiaError, LookupError):
    """Raised when an operator action names a queue that this scope has never had (no
    row in ``queuetopia_queues``: no job was ever created in it): ``scope`` and
    ``queue`` say which."""

    def __init__(self, scope: str, queue: str) -> None:
        self.scope = scope
        self.queue = queue
        super().__init__(f"no queue {queue!r} in scope {scope!r} (no job was ever created in it)")
