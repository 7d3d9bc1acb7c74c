"""Every statement of the PostgreSQL backend that is written in SQL, named and kept
together. Parameters are named like the columns they fill or compare (``:scope``,
``:queue``, ``:token``, ``:job_id``, ``:worker``); arrays of one value per queue are
named ``queue_*``, and the new jobs of CREATE_JOBS are one JSON array of objects
(``:jobs``, their keys named like the columns). Status values come from
:mod:`queuetopia_celery.jobs`.

Every statement here runs on the psycopg connection itself, with the driver's
``%(name)s`` placeholders (most through
:func:`queuetopia_celery.backends.postgres.raw_all`). The hot statements address jobs
by id alone (the lease ties them to their scope) and leases by their primary key, so
that their plans do not depend on the tables' statistics: with statistics taken while
the tables were nearly empty, PostgreSQL chose the open-jobs index for ``scope = ...``
and visited every open job of the scope for each job it finished (7 ms instead of 0.4
with 5,000 open jobs).

The head of a queue is its first open job by (scheduled_at, sequence), found first and
only then checked for due, so a not-yet-due head blocks the jobs behind it: the
function :func:`queue_head` says it once; the statements below use it.
"""

from __future__ import annotations

import dataclasses
import re

from ..jobs import OPEN_STATUSES, STATUS_DONE, STATUS_PENDING, STATUS_RUNNING, Job

JOB_FIELDS = ", ".join(f"j.{f.name}" for f in dataclasses.fields(Job))
OPEN = "(" + ", ".join(f"'{status}'" for status in sorted(OPEN_STATUSES)) + ")"


def driver_sql(sql: str) -> str:
    """``:name`` placeholders to psycopg's ``%(name)s``."""
    return re.sub(r"(?<![:\w]):([a-z_]+)", r"%(\1)s", sql)


def queue_head(queue: str, *, columns: str, exclude_job: str = "") -> str:
    """The head of queue ``queue`` (an SQL expression) of ``:scope``: its first open
    job by (scheduled_at, sequence), with ``columns`` (of ``hj``). With ``exclude_job``
    that job is passed over (a statement cannot see its own write: the finish excludes
    the job it just finished)."""
    excluded = f" AND hj.id <> {exclude_job}" if exclude_job else ""
    return f"""SELECT {columns}
        FROM queuetopia_jobs AS hj
        WHERE hj.scope = :scope AND hj.queue = {queue} AND hj.status IN {OPEN}{excluded}
        ORDER BY hj.scheduled_at, hj.sequence
        LIMIT 1"""


_CREATE_HEAD = (
    "hj.id, hj.status, hj.timeout, hj.scheduled_at, hj.sequence,"
    " coalesce(hj.next_attempt_at, hj.scheduled_at) AS due"
)

#: Create jobs (PostgreSQL) in one statement. Each queue row is upserted (in queue
#: order) and stays locked until the creating transaction ends, so producers of one
#: queue commit in sequence order; ``clock_timestamp()`` once the row is ours is the
#: default ``scheduled_at``, so (scheduled_at, sequence) follows commit order too.
#: ``due_at`` is lowered to the earliest due time of the new jobs. The jobs are the one
#: JSON parameter ``:jobs`` (``k``: the job's place among this call's jobs of its queue,
#: from 1; ``n``: their number); each queue's count and earliest due time are taken from
#: it here (array parameters cost psycopg more client CPU to convert than the statement).
#:
#: With ``:take_leases`` (autocommit only: the lease and the jobs commit together), the
#: statement also takes the lease of each queue whose head is pending and due: the head
#: among the queue's open jobs and the new ones. This statement's snapshot may miss jobs
#: of the queue that another producer committed while this one waited for the queue row;
#: so a queue is only decided here when the jobs it sees end exactly where the counter
#: stood before this statement (``last_sequence - n``). Any other queue, and one whose
#: lease is held, is left to a dispatch after the commit, as without ``:take_leases``.
#:
#: A unique job whose key an open job of the scope holds is not inserted (``ON CONFLICT
#: .. DO NOTHING`` on the partial unique index, which waits for a producer inserting the
#: same key to end): its sequence number is left unused, a gap that keeps the order, and
#: its queue is then left to the dispatch after the commit (the check above fails).
CREATE_JOBS = driver_sql(
    f"""
WITH r AS (
    SELECT * FROM json_to_recordset(CAST(:jobs AS json))
        AS r(queue text, action text, params json, k int, n int, timeout float8, max_backoff float8,
             max_attempts int, on_exhausted text, scheduled_at timestamptz, unique_key text,
             trace_context json)
), u AS (
    SELECT r.queue, CAST(count(*) AS int) AS n, min(r.scheduled_at) AS due,
        bool_or(r.scheduled_at IS NULL) AS has_now
    FROM r GROUP BY r.queue
), q AS (
    INSERT INTO queuetopia_queues AS qq (scope, queue, last_sequence, due_at)
    SELECT :scope, u.queue, u.n, least(u.due, CASE WHEN u.has_now THEN now() END)
    FROM u
    ORDER BY u.queue
    ON CONFLICT (scope, queue) DO UPDATE SET
        last_sequence = qq.last_sequence + excluded.last_sequence,
        due_at = CASE WHEN qq.due_at IS NULL OR excluded.due_at < qq.due_at
                      THEN excluded.due_at ELSE qq.due_at END
    RETURNING qq.queue, qq.last_sequence, clock_timestamp() AS locked_at, qq.paused
), j AS (
    INSERT INTO queuetopia_jobs AS j (scope, queue, action, params, sequence, timeout, max_backoff,
        max_attempts, on_exhausted, scheduled_at, status, attempts, inserted_at, create_key, unique_key,
        trace_context)
    SELECT :scope, r.queue, r.action, r.params, q.last_sequence - r.n + r.k, r.timeout,
        r.max_backoff, r.max_attempts, r.on_exhausted, coalesce(r.scheduled_at, q.locked_at),
        '{STATUS_PENDING}', 0, q.locked_at, CAST(:create_key AS text), r.unique_key,
        r.trace_context
    FROM r JOIN q ON q.queue = r.queue
    ON CONFLICT (scope, unique_key) WHERE unique_key IS NOT NULL AND status IN {OPEN}
    DO NOTHING
    RETURNING {JOB_FIELDS}
), old AS (
    SELECT q.queue, h.id, h.status, h.timeout, h.scheduled_at, h.sequence, h.due
    FROM q
    JOIN u ON u.queue = q.queue
    LEFT JOIN LATERAL ({queue_head("q.queue", columns=_CREATE_HEAD)}) AS h ON true
    WHERE CAST(:take_leases AS boolean)
        AND q.last_sequence - u.n = coalesce((
            SELECT max(x.sequence) FROM queuetopia_jobs AS x WHERE x.scope = :scope AND x.queue = q.queue
        ), 0)
), head AS (
    SELECT DISTINCT ON (c.queue) c.queue, c.id, c.status, c.timeout, c.due
    FROM (
        SELECT queue, id, status, timeout, scheduled_at, sequence, due FROM old WHERE id IS NOT NULL
        UNION ALL
        SELECT j.queue, j.id, j.status, j.timeout, j.scheduled_at, j.sequence, j.scheduled_at
        FROM j WHERE j.queue IN (SELECT queue FROM old)
    ) AS c
    ORDER BY c.queue, c.scheduled_at, c.sequence
), taken AS (
    INSERT INTO queuetopia_leases (scope, queue, token, job_id, locked_at, expires_at)
    SELECT :scope, head.queue, CAST(gen_random_uuid() AS text), head.id, now(),
        now() + make_interval(secs => CAST(:first_wait AS float8))
    FROM head
    WHERE CAST(:take_leases AS boolean) AND head.status = '{STATUS_PENDING}' AND head.due <= clock_timestamp()
        AND NOT EXISTS (SELECT 1 FROM q WHERE q.queue = head.queue AND q.paused)
    ORDER BY head.queue
    ON CONFLICT (scope, queue) DO NOTHING
    RETURNING queue, job_id, token
)
SELECT j.*, CAST(j.sequence - q.last_sequence AS int) AS back,
    t.job_id AS lease_job_id, t.token AS lease_token, head.timeout AS lease_timeout
FROM j JOIN q ON q.queue = j.queue
LEFT JOIN taken AS t ON t.queue = j.queue
LEFT JOIN head ON head.queue = t.queue
"""
)


_TAKE_HEAD = "hj.id, hj.status, hj.timeout, hj.scheduled_at, hj.next_attempt_at"
_FINISH_HEAD = "hj.id, hj.status, hj.timeout, coalesce(hj.next_attempt_at, hj.scheduled_at) AS due"


def _lease_heads(source: str, tail: str = "") -> str:
    """The CTEs ``head`` (each queue of ``source`` with its head job, if that head is
    pending and due; the head is found first, by (scheduled_at, sequence), and only
    then checked, so a not-yet-due head blocks) and ``taken`` (their leases, inserted
    in queue order with a fresh token, where nobody holds one)."""
    return f"""head AS (
    SELECT w.queue, h.id, h.timeout
    FROM {source}
    CROSS JOIN LATERAL ({queue_head("w.queue", columns=_TAKE_HEAD)}) AS h
    WHERE h.status = '{STATUS_PENDING}' AND coalesce(h.next_attempt_at, h.scheduled_at) <= now()
        AND NOT EXISTS (SELECT 1 FROM queuetopia_queues AS p
                        WHERE p.scope = :scope AND p.queue = w.queue AND p.paused)
    {tail}
), taken AS (
    INSERT INTO queuetopia_leases (scope, queue, token, job_id, locked_at, expires_at, locked_by)
    SELECT :scope, head.queue, CAST(gen_random_uuid() AS text), head.id, now(),
        now() + make_interval(secs => CAST(:first_wait AS float8)), CAST(:locked_by AS text)
    FROM head
    ORDER BY head.queue
    ON CONFLICT (scope, queue) DO NOTHING
    RETURNING queue, job_id, token
)"""


#: Take the leases of the given queues whose head is pending and due (PostgreSQL), with
#: the heads' timeouts, in one statement. The head is found first (lateral, by
#: (scheduled_at, sequence)) and only then checked, so a not-yet-due head blocks.
TAKE_LEASES = driver_sql(
    f"""
WITH {_lease_heads("unnest(CAST(:queues AS text[])) AS w(queue)", "ORDER BY w.queue LIMIT :limit")}
SELECT taken.queue, taken.job_id, taken.token, head.timeout
FROM taken JOIN head ON head.queue = taken.queue
"""
)

#: The scan (PostgreSQL): up to ``:limit`` queues whose ``due_at`` has passed and which
#: nobody holds, their heads, and their leases taken, in one statement (leases inserted
#: in queue order, as in TAKE_LEASES). A queue found with no lease taken (its head not
#: due, not pending, or gone) comes back with a NULL token: raise its ``due_at``.
SCAN = driver_sql(
    f"""
WITH due AS (
    SELECT qq.queue
    FROM queuetopia_queues AS qq
    WHERE qq.scope = :scope AND qq.due_at <= now() AND NOT qq.paused
        AND NOT EXISTS (SELECT 1 FROM queuetopia_leases AS l WHERE l.scope = :scope AND l.queue = qq.queue)
    ORDER BY qq.due_at
    LIMIT :limit
), {_lease_heads("due AS w")}
SELECT due.queue, taken.job_id, taken.token, head.timeout
FROM due
LEFT JOIN taken ON taken.queue = due.queue
LEFT JOIN head ON head.queue = taken.queue
"""
)

#: The hot statements address jobs by id alone (the lease ties them to their scope) and
#: leases by their primary key, so that their plans do not depend on the tables'
#: statistics: with statistics taken while the tables were nearly empty, PostgreSQL
#: chose the open-jobs index for ``scope = ...`` and visited every open job of the scope
#: for each job it finished (7 ms instead of 0.4 with 5,000 open jobs).
#:
#: Start an attempt (PostgreSQL): lease check and mark, attempt count, in one statement.
START = driver_sql(
    f"""
WITH l AS (
    UPDATE queuetopia_leases
    SET started_at = now(), expires_at = now() + make_interval(secs => :lease_seconds), locked_by = :worker
    WHERE scope = :scope AND queue = :queue AND token = :token AND job_id = :job_id AND started_at IS NULL
        AND NOT EXISTS (SELECT 1 FROM queuetopia_queues WHERE scope = :scope AND queue = :queue AND paused)
    RETURNING job_id
), j AS (
    UPDATE queuetopia_jobs AS j
    SET status = '{STATUS_RUNNING}', attempts = j.attempts + 1, attempted_at = now(), attempted_by = :worker
    WHERE j.id = :job_id AND j.status = '{STATUS_PENDING}' AND EXISTS (SELECT 1 FROM l)
    RETURNING {JOB_FIELDS}
)
SELECT (SELECT count(*) FROM l) AS leased, j.*
FROM (SELECT 1) AS one LEFT JOIN j ON true
"""
)

#: An attempt's end (PostgreSQL), in one statement: lock the lease under the token,
#: write the outcome (done; or failed: retried after ``:backoff``, held until
#: ``:until`` or exhausted), find the queue's next head (this statement cannot see its
#: own write, so the finished job is excluded by id), hand the lease to it with a new
#: token when it is pending and due, and begin its attempt at once when asked and it
#: fits; otherwise release the lease. A job to be retried or held stays the head (its
#: status stays '{STATUS_PENDING}'), so the lease is released. The head is taken first and only
#: then checked (due, pending), so a not-yet-due head still blocks the jobs behind it.
#: After a retried start found nothing to start: the job this worker began under this
#: token, if the lost try did begin it (its reply lost).
STARTED_BY = driver_sql(
    f"""
SELECT {JOB_FIELDS}
FROM queuetopia_leases AS l JOIN queuetopia_jobs AS j ON j.id = l.job_id
WHERE l.scope = :scope AND l.queue = :queue AND l.token = :token AND l.job_id = :job_id
    AND l.started_at IS NOT NULL AND l.locked_by = :worker
    AND j.status = '{STATUS_RUNNING}' AND j.attempted_by = :worker
"""
)

FINISH_AND_START = driver_sql(
    f"""
WITH lease AS (
    SELECT job_id FROM queuetopia_leases
    WHERE scope = :scope AND queue = :queue AND token = :token
    FOR UPDATE
), done AS (
    UPDATE queuetopia_jobs
    SET status = CAST(:status AS text), error = CAST(:error AS text),
        done_at = CASE WHEN CAST(:status AS text) = '{STATUS_DONE}' THEN now() ELSE done_at END,
        result = CASE WHEN CAST(:status AS text) = '{STATUS_DONE}' THEN CAST(:result AS json) ELSE result END,
        next_attempt_at = coalesce(now() + make_interval(secs => CAST(:backoff AS float8)),
                                   CAST(:until AS timestamptz))
    WHERE id = :job_id AND id = (SELECT job_id FROM lease) AND status = '{STATUS_RUNNING}'
    RETURNING id
), head AS (
    {queue_head(":queue", columns=_FINISH_HEAD, exclude_job=":job_id")}
), nxt AS (
    SELECT id, timeout,
        (CAST(:start_next AS boolean)
         AND (CAST(:deadline_left AS float8) IS NULL
              OR timeout + :time_limit_grace <= CAST(:deadline_left AS float8))) AS inline
    FROM head
    WHERE status = '{STATUS_PENDING}' AND due <= now() AND EXISTS (SELECT 1 FROM done)
        AND CAST(:status AS text) <> '{STATUS_PENDING}'
        AND NOT EXISTS (SELECT 1 FROM queuetopia_queues WHERE scope = :scope AND queue = :queue AND paused)
), moved AS (
    UPDATE queuetopia_leases AS l
    SET token = :new_token, job_id = nxt.id, locked_at = now(), resends = 0,
        started_at = CASE WHEN nxt.inline THEN now() END,
        expires_at = now() + make_interval(secs => CASE WHEN nxt.inline
            THEN greatest(nxt.timeout + :time_limit_grace, coalesce(CAST(:deadline_left AS float8), 0))
                + :lease_margin
            ELSE CAST(:first_wait AS float8) END),
        locked_by = CASE WHEN nxt.inline THEN :worker ELSE l.locked_by END
    FROM nxt
    WHERE l.scope = :scope AND l.queue = :queue AND l.token = :token
    RETURNING nxt.id, nxt.timeout, nxt.inline
), started AS (
    UPDATE queuetopia_jobs AS j
    SET status = '{STATUS_RUNNING}', attempts = j.attempts + 1, attempted_at = now(), attempted_by = :worker
    WHERE j.id = (SELECT id FROM moved WHERE moved.inline) AND j.status = '{STATUS_PENDING}'
    RETURNING {JOB_FIELDS}
), released AS (
    DELETE FROM queuetopia_leases
    WHERE scope = :scope AND queue = :queue AND token = :token AND NOT EXISTS (SELECT 1 FROM nxt)
    RETURNING 1
)
SELECT (SELECT count(*) FROM done) AS written, moved.id AS next_id, moved.timeout AS next_timeout,
    moved.inline, started.*
FROM (SELECT 1) AS one LEFT JOIN moved ON true LEFT JOIN started ON true
"""
)

#: The bulk path's first statement (PostgreSQL): upsert the queue rows of a batch (in
#: queue order; each stays locked until the transaction ends, as in CREATE_JOBS),
#: reserving ``:queue_counts`` sequence numbers each, with the time the row became ours
#: (the default ``scheduled_at``).
RESERVE_QUEUES = driver_sql(
    """
INSERT INTO queuetopia_queues AS qq (scope, queue, last_sequence, due_at)
SELECT :scope, u.queue, u.n, least(u.due, CASE WHEN u.has_now THEN now() END)
FROM unnest(CAST(:queues AS text[]), CAST(:queue_counts AS int[]), CAST(:queue_due_at AS timestamptz[]),
            CAST(:queue_has_now AS boolean[])) AS u(queue, n, due, has_now)
ORDER BY u.queue
ON CONFLICT (scope, queue) DO UPDATE SET
    last_sequence = qq.last_sequence + excluded.last_sequence,
    due_at = CASE WHEN qq.due_at IS NULL OR excluded.due_at < qq.due_at
                  THEN excluded.due_at ELSE qq.due_at END
RETURNING qq.queue, qq.last_sequence, clock_timestamp() AS locked_at
"""
)

#: ``:count`` new job ids, once the queue rows are ours (so ids follow the queue's
#: commit order, as with CREATE_JOBS).
RESERVE_IDS = driver_sql(
    "SELECT nextval(pg_get_serial_sequence('queuetopia_jobs', 'id')) FROM generate_series(1, :count)"
)

#: The bulk path's jobs: written by COPY (ids, sequences and times computed by the
#: client from the two statements above).
COPY_JOBS = (
    "COPY queuetopia_jobs (id, scope, queue, action, params, sequence, timeout, max_backoff, max_attempts,"
    " on_exhausted, scheduled_at, status, attempts, inserted_at, create_key, trace_context) FROM STDIN"
)
