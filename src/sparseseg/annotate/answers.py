"""Answers coming in: a parsed export file checked against the project's queries, classes and answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparseseg.annotate.importers import SKIP_LABEL, ParsedFile, RawAnswer
from sparseseg.annotate.store import ImageRow, NewAnswer, Snapshot, now
from sparseseg.errors import SparsesegError


@dataclass
class ResolvedAnswers:
    """What an import would store: new answers, replacements, and counts of the rest."""

    new: list[NewAnswer] = field(default_factory=list)
    replace: list[NewAnswer] = field(default_factory=list)
    unchanged: int = 0
    unanswered: int = 0
    skips: int = 0


def resolve_answers(path: Path, parsed: ParsedFile, snap: Snapshot, classes: Sequence[str], images: Sequence[ImageRow],
                    size: int, replace: bool, annotator: str) -> ResolvedAnswers:
    """Check every raw answer of an imported file against the queries, classes and stored answers.

    Nothing is written here: the caller stores the result in one transaction, or nothing when this
    raises (an import is all or nothing).

    Raises:
        SparsesegError: one line naming the file and the place in it (a pixel never queried, a class
            not in the project, an image of another project, a disagreement, a changed answer without
            `replace`).
    """
    def label(class_id: int | None) -> str:
        return SKIP_LABEL if class_id is None else classes[class_id]

    class_ids = {name: i for i, name in enumerate(classes)}
    image_ids = {r.name: r.id for r in images}
    names = {r.id: r.name for r in images}
    by_id = {q.id: q for q in snap.queries}
    by_pixel = {(q.image_id, q.y, q.x): q for q in snap.queries}
    stamp = now()
    decided: dict[int, tuple[int | None, RawAnswer]] = {}  # query id -> (class id, first answer)
    unanswered: set[int] = set()

    def fail(raw: RawAnswer, problem: str) -> SparsesegError:
        return SparsesegError(f"{path}: {raw.where}: {problem}")

    for raw in parsed.answers:
        # 1. which query: by pixel when the file gives one (the claimed query id must agree), else by id
        if raw.image is not None:
            if raw.image not in image_ids:
                raise fail(raw, f"image {raw.image!r} is not in this project (a file from another project?)")
            if not (0 <= raw.y < size and 0 <= raw.x < size):
                raise fail(raw, f"pixel (y={raw.y}, x={raw.x}) is outside the {size}x{size} image")
            query = by_pixel.get((image_ids[raw.image], raw.y, raw.x))
            if query is None:
                moved = by_id.get(raw.query_id) if raw.query_id is not None else None
                hint = (f"; query {moved.id} is at (y={moved.y}, x={moved.x}): was the point moved?"
                        if moved is not None and names[moved.image_id] == raw.image else "")
                raise fail(raw, f"pixel (y={raw.y}, x={raw.x}) of image {raw.image!r} was never queried{hint}")
            if raw.query_id is not None and raw.query_id != query.id:
                raise fail(raw, f"says query {raw.query_id} but lies on the pixel of query {query.id}")
        else:
            query = by_id.get(raw.query_id)
            if query is None:
                raise fail(raw, f"query {raw.query_id} does not exist in this project")
        # 2. which class
        if raw.label is None:
            unanswered.add(query.id)
            continue
        if raw.label == SKIP_LABEL:
            class_id = None
        elif raw.label in class_ids:
            class_id = class_ids[raw.label]
        else:
            raise fail(raw, f"class {raw.label!r} is not in the project (classes: {', '.join(classes)}; "
                            f"{SKIP_LABEL!r} = cannot tell)")
        # 3. one file, one answer per query
        if query.id in decided:
            first_class, first = decided[query.id]
            if first_class != class_id:
                raise fail(raw, f"query {query.id} is answered {label(first_class)!r} in {first.where} "
                                f"and {label(class_id)!r} here; resolve the disagreement first")
            continue
        decided[query.id] = (class_id, raw)
    # 4. against the stored answers
    out = ResolvedAnswers(unanswered=len(unanswered - set(decided) - set(snap.answers)))
    for query_id, (class_id, raw) in decided.items():
        answer = NewAnswer(query_id, class_id, raw.annotator or annotator, raw.time or stamp)
        current = snap.answers.get(query_id)
        if current is None:
            out.new.append(answer)
        elif current.class_id == class_id:
            out.unchanged += 1
            continue
        elif replace:
            out.replace.append(answer)
        else:
            q = by_id[query_id]
            raise fail(raw, f"query {query_id} (image {names[q.image_id]!r}, y={q.y}, x={q.x}) is already "
                            f"answered {label(current.class_id)!r} (import {current.import_id}); this file "
                            f"says {label(class_id)!r}: pass --replace to record the new answer")
        out.skips += class_id is None
    return out
