"""Benchmarks: queuetopia-celery against plain Celery and procrastinate.

Run with ``python -m bench`` (full) or ``python -m bench --quick``; see
docs/performance.md. Not part of the test run.
"""
