"""A new user's first hour, for real: the package is built and installed the way the
Dockerfile and the README say (``pip install .``) into a bare virtual environment (the
package's own dependencies only: no test or dev extras), and the README's commands run
from it, in a directory that holds only ``examples/`` (like the image's ``/app``), so
that the installed wheel is what runs.

The docker-compose file's commands run the same way (Docker itself does not run here).
Every command of the README's ``sh`` blocks is run by a test here (or, for the test
command itself, by CI): :data:`COVERED` says which, and a test fails when the README
has a command that is not in it. Where the README names a database, a broker or an
app of the user's, the test runs the same line with its own (a fresh database, a Redis
database or RabbitMQ of its own, ``examples.mailapp`` for ``myapp``); every other word
runs as written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from queuetopia_celery import Job, JobState, make_engine
from tests.conftest import PG_ADMIN_URL, ROOT, wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(420)]

README = ROOT / "README.md"
#: A Redis database of this test's own: the example uses Celery's default queue.
REDIS_URL = os.environ.get("QT_TEST_FIRST_HOUR_REDIS_URL", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("QT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

#: What the README's examples name, and what the tests give instead.
README_DATABASE = "mailapp"
README_DATABASE_URL = f"postgresql+psycopg://postgres@127.0.0.1/{README_DATABASE}"
README_BROKER_URL = "redis://127.0.0.1:6379/0"

#: Every command of the README's sh blocks -> the test that runs it (or why none does).
COVERED: dict[str, str] = {
    "pip install .": "the bare_venv fixture (the Dockerfile's RUN, as the README writes it)",
    "queuetopia-celery demo": "test_sqlite_demo_from_the_wheel",
    f"createdb -h 127.0.0.1 -U postgres {README_DATABASE}": "test_quick_start_*",
    f"export DATABASE_URL={README_DATABASE_URL} BROKER_URL={README_BROKER_URL}": "test_quick_start_*",
    'queuetopia-celery migrate --database-url "$DATABASE_URL"': "test_quick_start_*",
    "celery -A examples.mailapp worker -B --loglevel INFO &": "test_quick_start_*",
    "python -m examples.mailapp produce 20": "test_quick_start_*",
    'queuetopia-celery --database-url "$DATABASE_URL" --scope mail status': "test_quick_start_*",
    f"queuetopia-celery demo --database-url {README_DATABASE_URL} --broker {README_BROKER_URL}": (
        "test_postgresql_redis_demo_from_the_wheel"
    ),
    "celery -A myapp worker -B": "test_running_it_and_the_cli_from_the_wheel",
    "celery -A myapp worker -c 8": "test_running_it_and_the_cli_from_the_wheel",
    "celery -A myapp beat": "test_running_it_and_the_cli_from_the_wheel",
    "queuetopia-celery migrate --database-url URL": "test_running_it_and_the_cli_from_the_wheel",
    "queuetopia-celery migrate --database-url URL --dry-run": "test_running_it_and_the_cli_from_the_wheel",
    "queuetopia-celery -A myapp:mail status": "test_running_it_and_the_cli_from_the_wheel",
    "python -m queuetopia_celery --help": "test_running_it_and_the_cli_from_the_wheel",
    "pytest examples/test_mailapp.py": "test_the_testing_example_passes_run_after_run",
    "bash scripts/test.sh": "not here: it is the command that runs this test (.ci/run calls it)",
    "bash scripts/test.sh tests/chaos/test_soak.py --soak-minutes 10 --soak-seed 7": (
        "test_seeded_random_soak, one minute with a random seed (ten minutes is the slow tier, by hand)"
    ),
    "bash scripts/test.sh tests/chaos/test_postgres_outage.py --chaos-long": (
        "test_postgres_restarted_or_down_mid_run, without the 60 s outage (slow tier, by hand)"
    ),
    ".venv/bin/python scripts/reliability.py --defaults": (
        "not here: the report runs the chaos scenarios for 25 minutes (slow tier, by hand)"
    ),
    "QT_BACKLOG_SECONDS=300 bash scripts/test.sh tests/chaos/test_default_timings.py -k busy -s": (
        "test_a_busy_broker_gets_a_bounded_number_of_re_sent_messages, with its default 30 s backlog"
        " (the five-minute run is the slow tier, by hand)"
    ),
    # Metrics: tests/acceptance/test_metrics_worker.py runs them with a real prefork worker.
    "export PROMETHEUS_MULTIPROC_DIR=/var/run/queuetopia-metrics": (
        "test_prefork_children_counts_add_up_to_the_attempts_the_database_recorded (its own directory)"
    ),
    "queuetopia-celery -A myapp:mail metrics --port 9808 --top-queues 10": (
        "test_prefork_children_counts_add_up_to_the_attempts_the_database_recorded"
    ),
    "QUEUETOPIA_WEB_PASSWORD=change-me queuetopia-celery -A myapp:mail web --port 8080 --username ops": (
        "tests/acceptance/test_web_browser.py (with its own app and a free port; without the credentials too)"
    ),
    # With Django: tests/acceptance/test_examples_django_fastapi.py runs them as written.
    "createdb -h 127.0.0.1 -U postgres djangoshop": "test_with_django_as_the_readme_says",
    "cd examples/djangoshop": "test_with_django_as_the_readme_says",
    (
        "export DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/djangoshop"
        " BROKER_URL=redis://127.0.0.1:6379/0"
    ): "test_with_django_as_the_readme_says",
    "python manage.py migrate": "test_with_django_as_the_readme_says",
    "celery -A djangoshop worker --loglevel INFO &": "test_with_django_as_the_readme_says",
    "python manage.py place_orders 5": "test_with_django_as_the_readme_says",
    "python manage.py queuetopia status": "test_with_django_as_the_readme_says",
    # MySQL and MariaDB: the block, then the quick start's lines from migrate on.
    "pip install '.[mysql]'": "test_quick_start_on_mariadb_and_redis",
    'mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE mailapp"': "test_quick_start_on_mariadb_and_redis",
    (
        "export DATABASE_URL=mysql+pymysql://root@127.0.0.1/mailapp BROKER_URL=redis://127.0.0.1:6379/0"
    ): "test_quick_start_on_mariadb_and_redis",
}


def readme_blocks(lang: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    pattern = rf"^```{re.escape(lang)}\n(.*?)^```\s*$"
    return re.findall(pattern, README.read_text(), flags=re.MULTILINE | re.DOTALL)


def commands_of(block: str) -> list[str]:
    """The commands of an sh block: one per line, comments stripped."""
    lines = (re.sub(r"(^|\s+)#.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line]


#: The fences whose blocks are commands.
SHELL_LANGS = ("sh", "bash", "shell", "console")


def readme_commands() -> list[str]:
    blocks = [block for lang in SHELL_LANGS for block in readme_blocks(lang)]
    return [command for block in blocks for command in commands_of(block)]


def readme_command(command: str) -> str:
    """``command``, checked to be in the README as written."""
    assert command in readme_commands(), f"the README no longer has: {command}"
    return command


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace what the README names with the test's own; each name must be there."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not in {text!r}"
        text = text.replace(old, new)
    return text


def test_every_readme_command_is_run_by_a_test() -> None:
    commands = readme_commands()
    assert commands, "no sh block found in README.md"
    missing = [command for command in commands if command not in COVERED]
    stale = [command for command in COVERED if command not in commands]
    assert not missing, f"README commands no test runs (add them to COVERED and run them): {missing}"
    assert not stale, f"COVERED names commands the README no longer has: {stale}"


def test_the_readme_shows_the_example_files_whole() -> None:
    python = readme_blocks("python")
    for name in ("examples/mailapp.py", "examples/test_mailapp.py"):
        assert (ROOT / name).read_text() in python, f"the README's copy of {name} differs from the file"


# ---------------------------------------------------------------------------- the bare venv


@dataclasses.dataclass
class Image:
    """What the Dockerfile builds, here: a bare venv and the image's working directory."""

    venv: Path
    app: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QUEUETOPIA_", "QT_TEST_", "PYTHON", "VIRTUAL_ENV", "CELERY_"))
        }
        env.update(PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", COLUMNS="120")
        env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
        return env

    def sh(
        self, script: str, *, cwd: Path | None = None, timeout: float = 180, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=cwd or self.app,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def dockerfile_steps() -> list[tuple[str, str]]:
    steps = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            steps.append((instruction.upper(), rest.strip()))
    return steps


@pytest.fixture(scope="session")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Follow the Dockerfile with this machine's Python: a fresh venv, its COPY steps
    into a scratch root, its RUN (the README's ``pip install .``; pip's cache is kept,
    so the dependencies' wheels come from it after the first time)."""
    root = tmp_path_factory.mktemp("image")
    venv = root / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], check=False, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    image = Image(venv=venv, app=root)
    workdir = root
    for instruction, rest in dockerfile_steps():
        if instruction == "FROM":
            assert rest.startswith("python:3."), rest
        elif instruction == "WORKDIR":
            workdir = root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = shlex.split(rest)
            into = workdir / dest
            for source in sources:
                if (ROOT / source).is_dir():  # a directory's contents, as Docker does
                    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                    shutil.copytree(ROOT / source, into, dirs_exist_ok=True, ignore=ignore)
                elif dest.endswith("/") or len(sources) > 1:
                    into.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, into / Path(source).name)
                else:
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, into)
        elif instruction == "RUN":
            assert rest == "pip install --no-cache-dir .", f"teach this test the Dockerfile's RUN {rest!r}"
            # The same command without --no-cache-dir: pip's cache makes it quick.
            installed = image.sh(readme_command("pip install ."), cwd=workdir, timeout=400)
            assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
        else:
            pytest.fail(f"teach this test the Dockerfile's {instruction}")
    image.app = workdir
    assert sorted(p.name for p in image.app.iterdir()) == ["examples"], "the image's /app holds the example"
    return image


def test_the_bare_venv_holds_the_package_and_its_dependencies_only(bare_venv: Image) -> None:
    listed = bare_venv.sh("pip list --format=freeze")
    assert listed.returncode == 0, listed.stderr
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert {"queuetopia-celery", "celery", "kombu", "redis", "packaging", "psycopg"} <= names
    assert not names & {"pytest", "hypothesis", "ruff", "mypy", "import-linter", "pyyaml"}, names
    files = bare_venv.sh("pip show -f queuetopia-celery").stdout
    assert "queuetopia_celery/py.typed" in files
    assert "examples/" not in files, "the examples are not part of the wheel (the README says so)"
    where = bare_venv.sh('python -c "import queuetopia_celery; print(queuetopia_celery.__file__)"')
    assert where.stdout.strip().startswith(str(bare_venv.venv)), where.stdout + where.stderr


# ---------------------------------------------------------------------------- databases


@pytest.fixture
def fresh_database() -> Iterator[Callable[[], str]]:
    """Names of databases that do not exist yet (a README line creates them); all are
    dropped at the end."""
    names: list[str] = []

    def name() -> str:
        names.append(f"qt_first_hour_{os.getpid()}_{uuid.uuid4().hex[:6]}")
        return names[-1]

    yield name
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for db in names:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()


def url_of(database: str) -> str:
    return substitute(README_DATABASE_URL, {f"/{README_DATABASE}": f"/{database}"})


def create_database(database: str) -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
    admin.dispose()


def mail_jobs(database_url: str) -> list[Job]:
    from celery import Celery

    from queuetopia_celery import Queuetopia

    engine = make_engine(database_url)
    try:
        mail = Queuetopia("mail", app=Celery("reader"), engine=engine, disabled=True)
        return mail.list_jobs()
    finally:
        engine.dispose()


def check_each_queue_ran_in_order(
    jobs: list[Job], output: str, count: int, *, one_worker: bool = True
) -> None:
    """Every job done once; in each queue, a job started after the one before it ended
    (the database's times), and each job was printed once: with one worker, each
    queue's jobs in sequence order."""
    assert len(jobs) == count
    assert all(job.state is JobState.DONE and job.attempts == 1 for job in jobs)
    printed = re.findall(r"sending job #(\d+) \(seq (\d+) of (customer-\d)\)", output)
    for queue in ("customer-0", "customer-1", "customer-2"):
        ordered = sorted((job for job in jobs if job.queue == queue), key=lambda job: job.sequence)
        assert [job.params["n"] % 3 for job in ordered] == [int(queue[-1])] * len(ordered)
        assert [job.params["n"] for job in ordered] == sorted(job.params["n"] for job in ordered)
        for earlier, later in itertools.pairwise(ordered):
            assert earlier.done_at is not None and later.attempted_at is not None
            assert later.attempted_at >= earlier.done_at, (queue, earlier.id, later.id)
        seen = [(int(job_id), int(seq)) for job_id, seq, q in printed if q == queue]
        expected = [(job.id, job.sequence) for job in ordered]
        assert (seen if one_worker else sorted(seen, key=lambda pair: pair[1])) == expected, (queue, seen)


class Group:
    """A process group started from a shell script, with what it printed in a file."""

    def __init__(self, image: Image, script: str, log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.shell = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=image.app,
                env=image.env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.shell.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.shell.poll()  # reaps the shell: a zombie would still count as the group's
            try:
                os.killpg(self.shell.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.shell.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.shell.wait(5)


def quick_start_block() -> str:
    blocks = [block for block in readme_blocks("sh") if "celery -A examples.mailapp worker -B" in block]
    assert len(blocks) == 1, "the README has one quick start block"
    return blocks[0]


def run_quick_start(image: Image, fresh_database: Callable[[], str], broker: str, tmp_path: Path) -> None:
    """The README's quick start block as one shell script, with the test's database
    and broker; then wait for the 20 jobs and check each queue's order."""
    database = fresh_database()
    script = substitute(
        quick_start_block(),
        {
            f"postgres {README_DATABASE}\n": f"postgres {database}\n",
            f"127.0.0.1/{README_DATABASE} ": f"127.0.0.1/{database} ",
            f"BROKER_URL={README_BROKER_URL}": f"BROKER_URL={broker}",
        },
    )
    group = Group(image, script, tmp_path / "quick-start.log", {})
    try:
        wait_for(lambda: group.shell.poll() is not None, timeout=120, message="the quick start's commands")
        assert group.shell.returncode == 0, group.output()[-4000:]
        assert "created 20 jobs in 3 queues" in group.output()

        def all_done() -> bool:
            if "Traceback" in group.output():
                pytest.fail(group.output()[-4000:])
            jobs = mail_jobs(url_of(database))
            return len(jobs) == 20 and all(job.state is JobState.DONE for job in jobs)

        wait_for(all_done, timeout=90, interval=0.5, message="the quick start's 20 jobs done")
        wait_for(lambda: group.output().count("sending job #") == 20, timeout=10, message="20 lines printed")
        check_each_queue_ran_in_order(mail_jobs(url_of(database)), group.output(), 20)
        assert not list(image.app.glob("celerybeat-schedule*")), "beat wrote its schedule into the checkout"
    finally:
        group.stop()


def test_quick_start_on_postgresql_and_redis(
    bare_venv: Image, fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    run_quick_start(bare_venv, fresh_database, REDIS_URL, tmp_path)


def test_quick_start_on_postgresql_and_rabbitmq(
    bare_venv: Image, fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    run_quick_start(bare_venv, fresh_database, AMQP_URL, tmp_path)


def test_quick_start_on_mariadb_and_redis(bare_venv: Image, tmp_path: Path) -> None:
    """The README's MySQL and MariaDB block (the extra installed from this checkout, the
    database created, the URL exported), then the quick start's lines from migrate on,
    on a MariaDB database of the test's own."""
    installed = bare_venv.sh(readme_command("pip install '.[mysql]'"), cwd=ROOT, timeout=400)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    (block,) = [block for block in readme_blocks("sh") if "pip install '.[mysql]'" in block]
    quick = quick_start_block()
    script = "\n".join(commands_of(block)[1:]) + "\n" + quick[quick.index("queuetopia-celery migrate") :]
    database = f"qt_first_hour_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    script = substitute(
        script,
        {
            'DATABASE mailapp"': f'DATABASE {database}"',
            "127.0.0.1/mailapp ": f"127.0.0.1/{database} ",
            f"BROKER_URL={README_BROKER_URL}": f"BROKER_URL={REDIS_URL}",
        },
    )
    url = f"mysql+pymysql://root@127.0.0.1/{database}"
    group = Group(bare_venv, script, tmp_path / "quick-start-mariadb.log", {})
    try:
        wait_for(lambda: group.shell.poll() is not None, timeout=120, message="the block's commands")
        assert group.shell.returncode == 0, group.output()[-4000:]
        assert "created 20 jobs in 3 queues" in group.output()

        def all_done() -> bool:
            if "Traceback" in group.output():
                pytest.fail(group.output()[-4000:])
            jobs = mail_jobs(url)
            return len(jobs) == 20 and all(job.state is JobState.DONE for job in jobs)

        wait_for(all_done, timeout=90, interval=0.5, message="the 20 jobs done on MariaDB")
        wait_for(lambda: group.output().count("sending job #") == 20, timeout=10, message="20 lines printed")
        check_each_queue_ran_in_order(mail_jobs(url), group.output(), 20)
    finally:
        group.stop()
        admin = sa.create_engine("mysql+pymysql://root@127.0.0.1/test")
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{database}`"))
        admin.dispose()


def check_demo_summary(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "12/12 jobs run in 14 attempts" in out.stdout
    for queue in ("account-7", "account-42", "mailbox-ada"):
        assert f"{queue}: one job at a time, in creation order: ok" in out.stdout
    assert "Traceback" not in out.stderr


def test_sqlite_demo_from_the_wheel(bare_venv: Image, tmp_path: Path) -> None:
    out = bare_venv.sh(readme_command("queuetopia-celery demo"), cwd=tmp_path)
    check_demo_summary(out)
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"


def test_postgresql_redis_demo_from_the_wheel(
    bare_venv: Image, fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    import redis

    database = fresh_database()
    create_database(database)
    command = readme_command(
        f"queuetopia-celery demo --database-url {README_DATABASE_URL} --broker {README_BROKER_URL}"
    )
    out = bare_venv.sh(
        substitute(command, {README_DATABASE_URL: url_of(database), README_BROKER_URL: REDIS_URL}),
        cwd=tmp_path,
    )
    check_demo_summary(out)
    scope = re.search(r"\(scope (demo-\w+)\)", out.stdout)
    assert scope, out.stdout
    assert "cleaned up" in out.stdout
    engine = make_engine(url_of(database))
    try:
        with engine.connect() as conn:
            for table in ("queuetopia_jobs", "queuetopia_queues", "queuetopia_leases"):
                assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == 0, table
    finally:
        engine.dispose()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert list(client.scan_iter(match=f"*{scope.group(1)}*")) == []
    finally:
        client.close()


def test_running_it_and_the_cli_from_the_wheel(
    bare_venv: Image, fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    database = fresh_database()
    create_database(database)
    url = url_of(database)
    helped = bare_venv.sh(readme_command("python -m queuetopia_celery --help"))
    assert helped.returncode == 0 and "migrate" in helped.stdout, helped.stdout + helped.stderr
    dry = bare_venv.sh(
        substitute(readme_command("queuetopia-celery migrate --database-url URL --dry-run"), {"URL": url})
    )
    assert dry.returncode == 0 and "CREATE TABLE" in dry.stdout, dry.stdout + dry.stderr
    migrated = bare_venv.sh(
        substitute(readme_command("queuetopia-celery migrate --database-url URL"), {"URL": url})
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    env = {"DATABASE_URL": url, "BROKER_URL": REDIS_URL}
    app = {"myapp": "examples.mailapp"}
    # The README's three ways at once: a worker, a standalone beat, and a worker with
    # embedded beat ("several beats are harmless").
    worker, beat, worker_beat = (
        Group(bare_venv, substitute(readme_command(command), app), tmp_path / f"{n}.log", env)
        for n, command in enumerate(
            ("celery -A myapp worker -c 8", "celery -A myapp beat", "celery -A myapp worker -B")
        )
    )
    try:
        produced = bare_venv.sh("python -m examples.mailapp produce 9", **env)
        assert produced.returncode == 0, produced.stderr

        def all_done() -> bool:
            jobs = mail_jobs(url)
            return len(jobs) == 9 and all(job.state is JobState.DONE for job in jobs)

        wait_for(all_done, timeout=90, interval=0.5, message="9 jobs done by the workers")
        assert beat.shell.poll() is None, beat.output()

        def outputs() -> str:
            return worker.output() + worker_beat.output()

        wait_for(lambda: outputs().count("sending job #") == 9, timeout=10, message="9 lines printed")
        check_each_queue_ran_in_order(mail_jobs(url), outputs(), 9, one_worker=False)
        # The operator CLI through the app itself, from the image's working directory.
        command = substitute(readme_command("queuetopia-celery -A myapp:mail status"), app)
        status = bare_venv.sh(command, **env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.startswith("scope 'mail': "), status.stdout
    finally:
        for group in (worker, beat, worker_beat):
            group.stop()
    assert not list(bare_venv.app.glob("celerybeat-schedule*"))


def test_the_testing_example_passes_run_after_run(tmp_path: Path) -> None:
    """The README's Testing example, with the test venv's pytest, twice in a row."""
    command = readme_command("pytest examples/test_mailapp.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUETOPIA_", "QT_TEST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for run in (1, 2):
        out = subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, f"run {run}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
        assert "1 passed" in out.stdout


def test_docker_compose_commands_from_the_image(
    bare_venv: Image, fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    """Docker does not run here: the compose file's producer, then its worker, run as
    written from the image's working directory (the bare venv), their environment
    pointed at this machine's services."""
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    database = fresh_database()
    create_database(database)

    def env_of(service: str) -> dict[str, str]:
        env = {}
        for name, value in services[service]["environment"].items():
            if value.startswith("postgresql+psycopg://"):
                env[name] = url_of(database)
            elif value.startswith("redis://redis:"):
                env[name] = REDIS_URL
            else:
                pytest.fail(f"teach this test the compose variable {name}={value}")
        return env

    producer = bare_venv.sh(shlex.join(services["producer"]["command"]), **env_of("producer"))
    assert producer.returncode == 0, producer.stdout + producer.stderr
    assert "created 30 jobs in 3 queues" in producer.stdout
    worker = Group(
        bare_venv, shlex.join(services["worker"]["command"]), tmp_path / "worker.log", env_of("worker")
    )
    try:

        def all_done() -> bool:
            jobs = mail_jobs(url_of(database))
            return len(jobs) == 30 and all(job.state is JobState.DONE for job in jobs)

        wait_for(all_done, timeout=90, interval=0.5, message="the compose producer's 30 jobs done")
        wait_for(lambda: worker.output().count("sending job #") == 30, timeout=10, message="30 lines")
        check_each_queue_ran_in_order(mail_jobs(url_of(database)), worker.output(), 30)
    finally:
        worker.stop()
