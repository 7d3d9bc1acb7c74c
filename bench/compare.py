"""``python -m bench --compare REV [--quick] [--only ...] [--runs N]``: this checkout
against another revision of queuetopia-celery, side by side in one session.

REV (a commit, tag or branch, e.g. ``main~5``) is exported with ``git archive`` and
installed (not editable) into its own virtual environment beside every package of the
running one at the same version, so that only the library differs. Each revision is
driven by its own side process (``bench.side``, run by its own Python) with its own
database, migrated by its own revision's migrations, and its own ``celery worker``
processes; the scenario code is this checkout's ``bench`` package for both (a copy of
it runs next to REV's install, without this checkout's ``queuetopia_celery`` on the
path). Every measurement is run for both revisions run by run, alternately first
(current, REV; REV, current; ...), so that load drifting over the session hits both;
the result gives each side's median (min-max) and the ratio current / REV of each pair
of runs (median, min-max)."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .env import ENQUEUE_MODES, ROOT, load, summary

#: The scenarios that can be compared, and the side command each measurement runs.
COMPARABLE = ("throughput", "latency", "enqueue")
CURRENT = "current"

#: What the bench's side process and workers import besides REV and its dependencies.
BENCH_NEEDS = ("celery[redis]", "redis", "sqlalchemy", "psycopg[binary]", "prometheus_client")
#: Bumped when the way REV's environment is built changes (a kept one is rebuilt).
BUILD = "4"

Step = tuple[str, str, str, dict[str, Any]]  # (scenario, key, side command, its arguments)


def log(*args: Any) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------- pure logic


def order(labels: Sequence[str], run: int) -> list[str]:
    """Who goes first in run ``run``: the given order on even runs, reversed on odd
    ones (A B, B A, A B, ...), so that neither side always runs right after the other."""
    return list(labels) if run % 2 == 0 else list(reversed(labels))


def plan(names: Sequence[str], cfg: dict[str, Any]) -> list[Step]:
    """The measurements of the scenarios ``names``, in order."""
    steps: list[Step] = []
    for name in names:
        if name == "throughput":
            for queues, per_queue in cfg["shapes"]:
                args = {"queues": queues, "per_queue": per_queue}
                steps.append((name, f"{queues}x{per_queue}", name, args))
        elif name == "latency":
            steps.append((name, "idle worker", name, {"samples": cfg["latency_samples"]}))
        elif name == "enqueue":
            for mode in ENQUEUE_MODES:
                n_total = cfg["enqueue_one"] if mode == "one" else cfg["enqueue_bulk"]
                for procs in (1, 4):
                    for target in ("many", "one_queue"):
                        args = {"mode": mode, "procs": procs, "target": target, "n_total": n_total}
                        steps.append((name, f"{mode}/{procs}p/{target}", name, args))
        else:
            raise ValueError(f"scenario {name!r} cannot be compared (only {', '.join(COMPARABLE)})")
    return steps


def metrics(command: str, result: Any) -> dict[str, tuple[float, str]]:
    """The figures of one side's answer: {name: (value, which is better)}."""
    if command == "throughput":
        out = {"jobs/s": (float(result["rate"]), "higher")}
        gaps = result.get("gaps_ms") or []
        if gaps:
            from .env import percentile

            out["gap p50 ms"] = (percentile(gaps, 50), "lower")
            out["gap p99 ms"] = (percentile(gaps, 99), "lower")
        return out
    if command == "latency":
        from .env import percentile

        return {f"p{p} ms": (percentile(result, p), "lower") for p in (50, 95, 99)}
    if command == "enqueue":
        return {"jobs/s": (float(result), "higher")}
    raise ValueError(f"unknown command {command!r}")


def compared(current: Sequence[float], rev: Sequence[float], better: str) -> dict[str, Any]:
    """Both sides' runs, their median (min-max), and the ratio current / REV of each
    pair of runs (run i of one with run i of the other), summarised the same way."""
    if len(current) != len(rev) or not current:
        raise ValueError(f"unpaired runs: {len(current)} and {len(rev)}")
    ratios = [c / r if r else float("inf") for c, r in zip(current, rev, strict=True)]
    return {
        "better": better,
        "current": {**summary(current), "values": list(current)},
        "rev": {**summary(rev), "values": list(rev)},
        "ratio": {**summary(ratios), "values": ratios},
    }


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _span(entry: dict[str, Any]) -> str:
    return f"{_num(entry['median'])} ({_num(entry['min'])}-{_num(entry['max'])})"


def markdown(results: dict[str, Any]) -> str:
    rev = results["compare"]["rev"]
    lines = [
        f"### current ({results['compare'][CURRENT]['label']}) vs {rev}"
        f" ({results['compare']['rev_commit'][:10]}), median (min-max) of"
        f" {results['config']['runs']} runs each",
        "",
        f"| scenario | measurement | current | {rev} | current / {rev} (paired runs) |",
        "|---|---|---|---|---|",
    ]
    for scenario, entries in results["scenarios"].items():
        for key, figures in entries.items():
            if key.startswith("_"):
                continue
            for name, entry in figures.items():
                better = "higher is better" if entry["better"] == "higher" else "lower is better"
                lines.append(
                    f"| {scenario} {key} | {name} ({better}) | {_span(entry['current'])}"
                    f" | {_span(entry['rev'])} | {entry['ratio']['median']:.2f}"
                    f" ({entry['ratio']['min']:.2f}-{entry['ratio']['max']:.2f}) |"
                )
    lines.append("")
    for label, key in ((CURRENT, CURRENT), (rev, "rev_side")):
        side = results["compare"].get(key, {})
        if "queuetopia_celery_file" in side:
            lines.append(
                f"{label}: `{side['queuetopia_celery_file']}`, migration head {side.get('migration_head')}."
            )
    lines += [
        "",
        f"Load average before / after: {results.get('load_before')} / {results.get('load_after')};"
        f" total {results.get('seconds')} s.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- building REV


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def resolve(rev: str) -> str:
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"python -m bench --compare: {rev!r} is not a commit of this repository") from None


def prepare(commit: str) -> tuple[Path, Path]:
    """REV's virtual environment (its Python) and a directory holding a copy of this
    checkout's ``bench`` package (to run from, without this checkout on the path).
    The environment is kept in the temp dir, keyed by commit, for the next comparison;
    the copy of ``bench`` is this process's own, removed at exit."""
    base = Path(tempfile.gettempdir()) / f"qt-bench-rev-{commit[:12]}"
    python = base / "venv" / "bin" / "python"
    ready = f"{commit} {BUILD}"
    if not (base / "ready").exists() or (base / "ready").read_text() != ready:
        log(f"== building {commit[:10]} into {base}")
        shutil.rmtree(base, ignore_errors=True)
        (base / "src").mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (base / "src.tar").write_bytes(archive)
        with tarfile.open(base / "src.tar") as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
                tar.extractall(base / "src", filter="data")
            else:  # our own git archive
                tar.extractall(base / "src")
        # The same dependency versions as this environment: only the library differs.
        freeze = subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        pins = [line for line in freeze if "==" in line and not line.startswith("queuetopia-celery")]
        (base / "constraints.txt").write_text("\n".join(pins) + "\n")
        subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        # Every package of this environment at its version, REV in place of this
        # checkout: the two sides then differ only by the library (with fewer packages
        # on REV's side, identical code measured 0.91-0.93 and 1.06-1.08 on the two
        # throughput shapes, 0.97-1.04 once they matched). If REV cannot live with them
        # all (an old revision's pins), REV and what the bench imports, constrained.
        done = subprocess.run(
            [*pip, "-r", str(base / "constraints.txt"), str(base / "src")],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            log(f"   {commit[:10]} does not install beside every package of this environment; only its own")
            done = subprocess.run(
                [*pip, "-c", str(base / "constraints.txt"), str(base / "src"), *BENCH_NEEDS],
                check=False,
                capture_output=True,
                text=True,
            )
        if done.returncode:
            raise SystemExit(f"installing {commit[:10]} failed:\n{done.stdout}{done.stderr}")
        (base / "ready").write_text(ready)
    # This run's own copy: two comparisons of one commit may run at once.
    code = base / f"code-{os.getpid()}"
    shutil.rmtree(code, ignore_errors=True)
    shutil.copytree(ROOT / "bench", code / "bench", ignore=shutil.ignore_patterns("__pycache__", "results"))
    atexit.register(shutil.rmtree, code, ignore_errors=True)
    return python, code


# ---------------------------------------------------------------- the side processes


class SideProcess:
    """A ``bench.side`` process and its command channel."""

    def __init__(self, label: str, python: Path | str, cwd: Path) -> None:
        self.label = label
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [str(python), "-m", "bench.side"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **args: Any) -> Any:
        stdin, stdout = self._pipes()
        stdin.write(json.dumps({"op": op, **args}) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} side exited (code {self.proc.wait(10)})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the {self.label} side failed on {op}:\n{answer['error']}")
        return answer["ok"]

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def close(self) -> None:
        """Ask it to stop its workers and drop its database; terminate it if it does not."""
        try:
            stdin, _ = self._pipes()
            stdin.write(json.dumps({"op": "close"}) + "\n")
            stdin.close()
            self.proc.wait(60)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.terminate()
            self.proc.wait(60)


def run(rev: str, names: Sequence[str], cfg: dict[str, Any], results: dict[str, Any], out_dir: Path) -> int:
    """Compare this checkout with ``rev`` on the scenarios ``names``; ``results`` holds
    the run's header (command, machine, versions, ...)."""
    if rev == CURRENT:
        raise SystemExit(f"python -m bench --compare: name the revision by its commit, not {CURRENT!r}")
    steps = plan(names, cfg)
    commit = resolve(rev)
    python, code = prepare(commit)
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    results["compare"] = {
        "rev": rev,
        "rev_commit": commit,
        CURRENT: {"label": _git("rev-parse", "--short", "HEAD") + (" + changes" if dirty else "")},
        "current_commit": _git("rev-parse", "HEAD"),
        "current_dirty": dirty,
    }
    results["scenarios"] = {}
    stamp = results["started"].replace(":", "")
    path = out_dir / f"{stamp}-compare-{commit[:8]}{'-quick' if results['quick'] else ''}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    sides: dict[str, SideProcess] = {}
    try:
        sides[CURRENT] = SideProcess(CURRENT, sys.executable, ROOT)
        sides[rev] = SideProcess(rev, python, code)
        for label, side in sides.items():
            key = CURRENT if label == CURRENT else "rev_side"
            results["compare"].setdefault(key, {}).update(side.call("hello"))
            if {"throughput", "latency"} & set(names):
                side.call("start")
        for name in names:
            results["scenarios"][name] = {}
        for scenario, key, command, args in steps:
            log(f"== {scenario} {key} (load {load()})")
            values: dict[str, dict[str, list[float]]] = {}
            better: dict[str, str] = {}
            for run_index in range(cfg["runs"]):
                for label in order(list(sides), run_index):
                    answer = sides[label].call(command, **args)
                    figures = metrics(command, answer)
                    for figure, (value, which) in figures.items():
                        values.setdefault(figure, {CURRENT: [], rev: []})[label].append(value)
                        better[figure] = which
                    shown = ", ".join(f"{f} {_num(v)}" for f, (v, _) in figures.items())
                    log(f"  run {run_index + 1} {label}: {shown}")
            results["scenarios"][scenario][key] = {
                figure: compared(v[CURRENT], v[rev], better[figure]) for figure, v in values.items()
            }
            path.write_text(json.dumps(results, indent=1))  # partial results survive
    finally:
        for side in sides.values():
            side.close()
    results["seconds"] = round(time.perf_counter() - began, 1)
    results["load_after"] = load()
    path.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"results: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.compare RESULTS.json``: re-render a saved comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    print(markdown(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
