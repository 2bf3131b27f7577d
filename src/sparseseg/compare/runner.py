"""Running a planned comparison: finished runs are skipped, partial ones resume, new ones start; in
this process (`jobs=1`) or as N single-threaded `sparseseg run` subprocesses. One failing run is
reported and the others go on."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparseseg.compare.plan import RunSpec
from sparseseg.compare.rundir import read_rounds
from sparseseg.config import load_config
from sparseseg.errors import SparsesegError

Progress = Callable[[str, int, int], None]


@dataclass
class RunOutcome:
    """What happened to one run: 'skipped' (already finished), 'finished', 'failed', or 'missing'
    (not finished, and not run because only a summary was asked for)."""

    spec: RunSpec
    status: str
    message: str = ""
    seconds: float = 0.0


def run_status(spec: RunSpec) -> tuple[str, str]:
    """('complete' | 'partial' | 'new' | 'stale', why): stale is a finished run of another config."""
    if not (spec.out / "rounds.jsonl").exists():
        return ("partial" if (spec.out / "config.yaml").exists() else "new"), ""
    done = len(read_rounds(spec.out))
    if done < spec.config.rounds:
        return "partial", ""
    try:
        same = load_config(spec.out / "config.yaml") == spec.config
    except SparsesegError as exc:
        return "stale", str(exc)
    if not same:
        return "stale", (f"{spec.out}: holds a finished run with a different config; "
                         "move it away or compare into another --out")
    return "complete", ""


def worker_command(spec: RunSpec, config_path: Path) -> list[str]:
    """The `sparseseg run` command line that performs `spec` in a subprocess."""
    command = [sys.executable, "-m", "sparseseg.cli", "run", str(config_path)]
    for pair in spec.overrides:
        command += ["--set", pair]
    return command


def _worker_env() -> dict[str, str]:
    # One thread per run: N runs of many BLAS/OpenMP threads each on the same cores are far slower
    # than N single-threaded runs. The source folder is prepended so the child imports this copy.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    text = lines[-1] if lines else ""
    return text.removeprefix("error: ")[:300]


def _run_in_process(spec: RunSpec, progress: Progress | None) -> str:
    """Run one experiment here; '' on success, else the error (its traceback goes to the log)."""
    from sparseseg.loop.experiment import Experiment

    try:
        Experiment(spec.config, progress=progress).run()
    except Exception as exc:  # noqa: BLE001 - one failing run must not stop the others
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        with spec.log.open("a") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.name}\n{traceback.format_exc()}")
        text = " ".join(str(exc).split())
        return text if isinstance(exc, SparsesegError) else f"{type(exc).__name__}: {text}"
    return ""


def run_comparison(
    specs: Sequence[RunSpec],
    config_path: Path,
    jobs: int = 1,
    progress: Progress | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every spec that is not finished yet; returns one outcome per spec, in spec order.

    Args:
        specs: from `plan_comparison`.
        config_path: the CONFIG they were planned from (subprocesses load it again).
        jobs: 1 runs in this process (progress of each round reaches `progress`); N > 1 runs N
            `sparseseg run` subprocesses at once, one CPU thread each, output to `<run>.log`.
        progress: `(task, done, total)`; task "runs" counts finished, skipped and failed runs.
        on_outcome: called as each run is skipped, finishes or fails.
    """
    if jobs < 1:
        raise SparsesegError(f"--jobs {jobs}: must be at least 1")
    outcomes: dict[int, RunOutcome] = {}

    def record(i: int, outcome: RunOutcome) -> None:
        outcomes[i] = outcome
        if on_outcome:
            on_outcome(outcome)
        if progress:
            progress("runs", len(outcomes), len(specs))

    todo = []
    for i, spec in enumerate(specs):
        state, why = run_status(spec)
        if state == "complete":
            record(i, RunOutcome(spec, "skipped", "already finished"))
        elif state == "stale":
            record(i, RunOutcome(spec, "failed", why))
        else:
            todo.append(i)
    if jobs == 1:
        for i in todo:
            start = time.perf_counter()
            error = _run_in_process(specs[i], progress)
            record(i, RunOutcome(specs[i], "failed" if error else "finished", error, time.perf_counter() - start))
    else:
        _run_subprocesses(specs, todo, config_path, jobs, record)
    return [outcomes[i] for i in range(len(specs))]


def outcomes_without_running(specs: Sequence[RunSpec]) -> list[RunOutcome]:
    """One outcome per spec when nothing is run: finished runs are 'skipped', the rest 'missing'
    (or 'failed' when a finished run of another config is in the way)."""
    outcomes = []
    for spec in specs:
        state, why = run_status(spec)
        status = {"complete": "skipped", "stale": "failed"}.get(state, "missing")
        outcomes.append(RunOutcome(spec, status, why or f"not finished ({state})"))
    return outcomes


def _run_subprocesses(specs, todo, config_path, jobs, record) -> None:
    pending = list(reversed(todo))
    running: dict[int, tuple[subprocess.Popen, io.TextIOWrapper, float]] = {}
    env = _worker_env()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.pop()
                spec = specs[i]
                spec.log.parent.mkdir(parents=True, exist_ok=True)
                command = worker_command(spec, config_path)
                log = spec.log.open("a")
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
                running[i] = (proc, log, time.perf_counter())
            for i, (proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[i]
                spec = specs[i]
                seconds = time.perf_counter() - start
                if proc.returncode == 0:
                    record(i, RunOutcome(spec, "finished", "", seconds))
                else:
                    why = _last_line(spec.log) or f"exit code {proc.returncode}"
                    record(i, RunOutcome(spec, "failed", why, seconds))
            time.sleep(0.05)
    finally:  # interrupted (Ctrl-C): stop the children; their finished rounds are kept
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, log, _ in running.values():
            proc.wait()
            log.close()
