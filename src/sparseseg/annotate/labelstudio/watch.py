"""`pull --watch`: the active-learning loop against a live Label Studio project.

Every `interval` seconds: pull (import what was submitted). When the latest round has no pending
query left: train the head on every answer, query the next round and push it (its tasks carry the
head's masks). It ends after `max_rounds` new rounds, after `timeout` seconds, or on Ctrl-C; a
refused pull (a moved point, a changed answer) is reported and retried at the next poll, since the
team fixes it in Label Studio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sparseseg.annotate.labelstudio.client import LabelStudio
from sparseseg.annotate.labelstudio.sync import PullResult, PushResult, pull, push
from sparseseg.annotate.project import Project
from sparseseg.errors import SparsesegError


@dataclass
class WatchStatus:
    """What the status line shows."""

    round: int
    answered: int  # answered or skipped queries of the round
    pending: int
    phase: str  # waiting, pulling, training, querying, pushing
    detail: str = ""  # e.g. progress of a long phase, or why the last pull was refused


@dataclass
class WatchResult:
    rounds: list[int] = field(default_factory=list)  # rounds queried and pushed by this watch
    pulls: list[PullResult] = field(default_factory=list)  # pulls that imported something new
    pushes: list[PushResult] = field(default_factory=list)
    reason: str = ""  # why it ended: "max-rounds", "timeout"
    errors: list[str] = field(default_factory=list)  # refused pulls, in order (each once)


def round_counts(project: Project) -> tuple[int, int, int]:
    """(latest round, answered + skipped, pending) from the database."""
    rounds = project.status()["rounds"]
    if not rounds:
        raise SparsesegError(f"{project.root}: no round yet; run `sparseseg query {project.root}` first")
    r = rounds[-1]
    return r["round"], r["answered"] + r["skipped"], r["pending"]


def watch(project: Project, client: LabelStudio, max_rounds: int | None = None, timeout: float | None = None,
          interval: float = 5.0, replace: bool = False, masks: bool = True,
          on_status: Callable[[WatchStatus], None] | None = None,
          on_event: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> WatchResult:
    """Poll, and run the next round whenever the current one is fully answered (module docstring).

    Args:
        max_rounds: stop once this many new rounds have been queried and pushed (None: no limit).
        timeout: stop after this many seconds (None: no limit).
        on_status: called with the status line's content at every change of phase and every poll.
        on_event: called with one line for each thing that happened (answers imported, round pushed).
    """
    result = WatchResult()
    start = clock()
    say = on_event or (lambda text: None)

    def status(phase: str, detail: str = "") -> None:
        if on_status:
            r, answered, pending = round_counts(project)
            on_status(WatchStatus(r, answered, pending, phase, detail))

    def progress(task: str, done: int, total: int) -> None:
        status(phase, f"{task} {done}/{total}")

    round, _, _ = round_counts(project)
    phase = "pushing"
    first = push(project, client, round, masks=masks, progress=progress)
    if first.created or first.recovered:
        result.pushes.append(first)
        say(f"round {round}: {len(first.created) + len(first.recovered)} task(s) pushed")
    while True:
        phase = "pulling"
        status(phase)
        try:
            got = pull(project, client, replace=replace)
        except SparsesegError as exc:
            if not result.errors or result.errors[-1] != str(exc):
                result.errors.append(str(exc))
                say(f"pull refused, will retry: {exc}")
            got = None
        if got is not None and got.imported is not None and got.imported.already is None:
            result.pulls.append(got)
            i = got.imported
            say(f"imported {i.new} new answer(s) ({i.skips} unsure), {i.replaced} replaced, "
                f"{i.unanswered} point(s) still unanswered")
        round, answered, pending = round_counts(project)
        if pending == 0:  # the round is complete: the next one
            if max_rounds is not None and len(result.rounds) >= max_rounds:
                result.reason = "max-rounds"
                return result
            if _trainable(project):
                phase = "training"
                status(phase)
                project.train(progress=progress)
            phase = "querying"
            status(phase)
            queried = project.query(progress=progress)
            phase = "pushing"
            status(phase)
            pushed = push(project, client, queried.round, masks=masks, progress=progress)
            result.rounds.append(queried.round)
            result.pushes.append(pushed)
            say(f"round {queried.round}: {queried.queries} pixels queried, {len(pushed.created)} task(s) pushed"
                + (" with the head's masks" if pushed.predicted else ""))
            if max_rounds is not None and len(result.rounds) >= max_rounds:
                result.reason = "max-rounds"
                return result
            continue
        if timeout is not None and clock() - start >= timeout:
            result.reason = "timeout"
            return result
        phase = "waiting"
        status(phase, result.errors[-1] if result.errors and got is None else "")
        sleep(interval)


def _trainable(project: Project) -> bool:
    """Whether some answer is a class (only skips cannot train a head)."""
    return any(n for n in project.status()["class_histogram"].values())
