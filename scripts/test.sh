#!/usr/bin/env bash
# The test command: start PostgreSQL, Redis and MariaDB when they are not reachable, build a
# fresh virtual environment with the package and its test extras, lint, type-check,
# and run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_HOST=127.0.0.1 PG_PORT=5432
VENV=${QT_VENV:-.venv}
PYTHON=${PYTHON:-python3}

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }
redis_up() { "$PYTHON" - <<'PY' 2>/dev/null
import socket
s = socket.create_connection(("127.0.0.1", 6379), timeout=1)
s.sendall(b"PING\r\n")
assert s.recv(16).startswith(b"+PONG")
PY
}

if ! pg_up; then
  echo "PostgreSQL is not reachable: starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { echo "PostgreSQL did not start" >&2; exit 1; }
fi
if ! redis_up; then
  echo "Redis is not reachable: starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 60); do redis_up && break; sleep 0.5; done
  redis_up || { echo "Redis did not start" >&2; exit 1; }
fi

# MariaDB (the MySQL backend's tests): root without a password on 127.0.0.1:3306.
mariadb_up() { "$PYTHON" - <<'PY' 2>/dev/null
import socket
s = socket.create_connection(("127.0.0.1", 3306), timeout=1)
assert s.recv(64)[4:5] == b"\x0a"  # the server's greeting (protocol 10)
PY
}
if ! mariadb_up; then
  echo "MariaDB is not reachable: starting it"
  if [ ! -x /usr/sbin/mariadbd ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server >/dev/null
  fi
  mkdir -p /run/mysqld /var/log/mysql && chown mysql:mysql /run/mysqld /var/log/mysql
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1 --port=3306 \
    --socket=/run/mysqld/mysqld.sock --skip-name-resolve \
    --character-set-server=utf8mb4 >>/var/log/mysql/ci.log 2>&1 &
  for _ in $(seq 1 60); do mariadb_up && break; sleep 0.5; done
  mariadb_up || { echo "MariaDB did not start" >&2; exit 1; }
  # A fresh install lets root in through the socket only: open TCP to it, as the tests expect.
  mariadb --protocol=socket -uroot -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
    GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; CREATE DATABASE IF NOT EXISTS test;"
fi

# The chaos tier runs a private RabbitMQ node and PostgreSQL cluster of its own: it
# needs the server binaries (not the shared services).
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && [ -z "${QT_TEST_RABBITMQ_BIN:-}" ] \
    && command -v apt-get >/dev/null; then
  echo "rabbitmq-server is not installed: installing it"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null
fi

# tests/acceptance/test_pgbouncer.py runs a private PgBouncer (transaction pooling) in
# front of the shared PostgreSQL: it needs the binary only.
if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ] && [ -z "${QT_TEST_PGBOUNCER_BIN:-}" ] \
    && command -v apt-get >/dev/null; then
  echo "pgbouncer is not installed: installing it"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null
fi

# The web view's browser tests drive Debian's Chromium (Playwright, no browser download).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  echo "chromium is not installed: installing it"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import queuetopia_celery" 

echo "== ruff";        "$VENV/bin/ruff" check .
echo "== mypy";        "$VENV/bin/mypy"
echo "== import-linter"; "$VENV/bin/lint-imports"
echo "== pytest"
exec "$VENV/bin/python" -m pytest "$@"
