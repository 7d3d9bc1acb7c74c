"""A private PgBouncer (the Debian package's binary, which ``scripts/test.sh``
installs) in front of a PostgreSQL server: its own configuration in a temporary
directory, a free port, ``pool_mode = transaction`` and small pools, so that the
clients of a test really share server connections from one transaction to the next.
Used by tests/acceptance/test_pgbouncer.py and ``python -m bench.scaling --pgbouncer``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

USER = "postgres"


def pgbouncer_bin() -> str:
    """QT_TEST_PGBOUNCER_BIN, else ``pgbouncer`` on the PATH or in /usr/sbin."""
    found = os.environ.get("QT_TEST_PGBOUNCER_BIN") or shutil.which("pgbouncer")
    if not found and Path("/usr/sbin/pgbouncer").exists():
        found = "/usr/sbin/pgbouncer"
    if not found:
        raise RuntimeError(
            "pgbouncer is not installed: scripts/test.sh installs it (apt-get install pgbouncer)"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    """One PgBouncer process. ``databases`` maps each name clients connect to onto
    ``(server database, pool size)``; every pool is in transaction mode."""

    def __init__(
        self,
        databases: dict[str, tuple[str, int]],
        *,
        server_host: str = "127.0.0.1",
        server_port: int = 5432,
    ) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="qt-pgbouncer-"))
        self.log = self.workdir / "pgbouncer.log"
        lines = ["[databases]"]
        for name, (dbname, pool_size) in databases.items():
            lines.append(
                f"{name} = host={server_host} port={server_port} dbname={dbname} pool_size={pool_size}"
            )
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.workdir / "users.txt"),
            "admin_users": USER,
            "pool_mode": "transaction",
            "default_pool_size": "2",
            "max_client_conn": "500",
            "logfile": str(self.log),
            "pidfile": str(self.workdir / "pgbouncer.pid"),
        }
        lines += ["[pgbouncer]", *(f"{key} = {value}" for key, value in settings.items())]
        self.config = self.workdir / "pgbouncer.ini"
        self.config.write_text("\n".join(lines) + "\n")
        (self.workdir / "users.txt").write_text(f'"{USER}" ""\n')
        self.handle: subprocess.Popen[bytes] | None = None

    def url(self, database: str, query: str = "") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}{query}"

    def start(self, timeout: float = 30) -> None:
        args = [pgbouncer_bin(), str(self.config)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root.
            import pwd

            entry = pwd.getpwnam(USER)
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            args = ["runuser", "-u", USER, "--", *args]
        self.handle = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.handle.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.handle.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not listen within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (simple query protocol), as dicts."""
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={USER} dbname=pgbouncer",
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
        ) as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [column.name for column in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def count(self, what: str, database: str) -> int:
        """Clients or servers (``what``) of ``database``'s pool now."""
        return sum(1 for row in self.show(what) if row.get("database") == database)

    def cpu_seconds(self) -> float:
        """CPU time used by the PgBouncer process so far."""
        if self.handle is None:
            return 0.0
        pids: Sequence[int] = [self.handle.pid]
        if os.geteuid() == 0:
            # runuser forks PgBouncer: count its child.
            out = subprocess.run(
                ["pgrep", "-P", str(self.handle.pid)], capture_output=True, text=True, check=False
            )
            pids = [int(pid) for pid in out.stdout.split()] or pids
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def log_tail(self, size: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-size:]
        return ""

    def stop(self) -> None:
        if self.handle is not None and self.handle.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.handle.pid, 15)
            try:
                self.handle.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.handle.pid, 9)
                self.handle.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)
