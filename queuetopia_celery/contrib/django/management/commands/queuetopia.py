"""``python manage.py queuetopia status|jobs|show|retry|abort|purge ...``: the
``queuetopia-celery`` command on Django's settings (database and scope)."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from queuetopia_celery.contrib.django.queuetopia import database_url, default_scope

COMMANDS = ("status", "jobs", "show", "retry", "abort", "purge")


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Operate the job queues on Django's database: status, jobs, show ID, retry ID, "
        "abort ID --reason TEXT, purge --older-than 7d. Give --scope when the project has "
        "several Queuetopias. `manage.py queuetopia status -h` shows a command's options."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scope", help="The scope (default: QUEUETOPIA['SCOPE'] or the only one built)")
        parser.add_argument("command", choices=COMMANDS)
        parser.add_argument("rest", nargs=argparse.REMAINDER, help="The command's arguments and options.")

    def handle(self, *args: Any, **options: Any) -> None:
        from queuetopia_celery.cli import cli

        scope = options["scope"] or default_scope()
        argv = ["--database-url", database_url(), "--scope", scope, options["command"], *options["rest"]]
        try:
            cli.main(args=argv, prog_name="manage.py queuetopia", standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise CommandError(
                    f"queuetopia {options['command']} failed", returncode=int(exc.code)
                ) from None
        except Exception as exc:  # click's usage errors
            raise CommandError(str(exc)) from None
