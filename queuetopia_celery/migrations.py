"""Stands in for the package ``queuetopia_celery.migrations`` in a source checkout.

The migrations live in the project's top-level ``migrations/`` folder (``env.py``,
``steps.py``, ``versions/``). The wheel ships that folder as the package
``queuetopia_celery.migrations`` (pyproject.toml maps it in at build time) and leaves
this file out. In a source checkout or an editable install (``pip install -e .``) this
module makes itself a package whose one directory is that folder, so that
``from queuetopia_celery.migrations import steps`` and ``queuetopia-celery migrate``
work the same from both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__path__ = [str(Path(__file__).resolve().parent.parent / "migrations")]

if TYPE_CHECKING:  # what the import above finds at run time, for mypy
    from migrations import steps as steps  # noqa: PLC0414 (an explicit re-export)
