"""A producer process for the chaos suite: creates jobs in one queue in many
transactions (alone, in the caller's transaction, in bulk, some rolled back, some
holding the transaction open a while) and prints how many it committed.

Usage: python -m tests.chaos.producer SCOPE DATABASE_URL BROKER_URL CELERY_QUEUE QUEUE COUNT SEED
"""

from __future__ import annotations

import random
import sys
import time

from tests.apps import testapp


class _Rollback(Exception):
    pass


def main(argv: list[str]) -> int:
    scope, database_url, broker_url, celery_queue, queue, count, seed = argv
    rng = random.Random(int(seed))
    _, qt = testapp.build(
        scope, database_url=database_url, broker_url=broker_url, celery_queue=celery_queue, poll_interval=0.3
    )
    committed = made = 0
    while made < int(count):
        mode = rng.choice(("alone", "transaction", "bulk", "rollback"))
        params = {"echo": f"{seed}-{made}"}
        if mode == "alone":
            qt.create_job(queue, "fast_retry", params)
            committed += 1
        elif mode == "bulk":
            n = rng.randint(2, 5)
            qt.create_jobs([{"queue": queue, "action": "fast_retry", "params": params} for _ in range(n)])
            committed += n
        else:
            try:
                with qt.engine.begin() as conn:
                    qt.create_job(queue, "fast_retry", params, connection=conn)
                    time.sleep(rng.uniform(0, 0.03))  # hold the transaction open a little
                    if mode == "rollback":
                        raise _Rollback
                committed += 1
            except _Rollback:
                pass
        made += 1
    qt.engine.dispose()
    print(committed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
