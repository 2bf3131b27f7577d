"""The report of a labelling project (`sparseseg init`): rounds and answers, the class mix of the
answers, the imports and round times, the Label Studio link, and each queried image with its
points (answered in the class colour, unsure, pending) beside the head's prediction when the
project has a head. A project has no ground truth and no test split: there is no mIoU to plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparseseg.annotate.importers import SKIP_LABEL
from sparseseg.annotate.layout import DATA_DIR, HEAD_FILE, SPLIT
from sparseseg.annotate.project import Project
from sparseseg.data.readers import read_image
from sparseseg.report.charts import SERIES_COLOURS, Chart, Series, bar_chart, line_chart
from sparseseg.report.page import Page, esc, legend, table
from sparseseg.report.previews import (
    ANSWERED,
    PENDING,
    VOID,
    Marker,
    card,
    class_map,
    marker_legend,
    with_markers,
)

Progress = Callable[[str, int, int], None]


def _cumulative(values: list[int]) -> list[int]:
    return np.cumsum(values).tolist() if values else []


def project_page(root: Path, count: int = 6, predictions: bool = True, progress: Progress | None = None) -> Page:
    """The report of a labelling project."""
    proj = Project(root)
    try:
        return _page(proj, count, predictions, progress)
    finally:
        proj.close()


def _page(proj: Project, count: int, predictions: bool, progress: Progress | None) -> Page:
    info = proj.status()
    palette = [list(c) for c in proj.meta.palette]
    link = proj.store.ls_link()
    where = "not connected to Label Studio"
    if link is not None:
        pushed = proj.store.ls_tasks(link.id)
        where = f"Label Studio project {link.project} at {link.url}, {len(pushed)} task(s) pushed"
    t = info["totals"]
    page = Page(f"Labelling project {proj.root.name}",
                f"{info['images']} images at {info['size']}x{info['size']}; {len(info['rounds'])} round(s); "
                f"{t['answered']} answered, {t['skipped']} unsure, {t['pending']} pending; {where}; "
                f"project id {info['project_id']}")
    rounds = info["rounds"]
    xs = [r["round"] for r in rounds]
    progress_chart = line_chart(Chart("answers so far", "round", "queries", [
        Series("queried", xs, _cumulative([r["queried"] for r in rounds]), SERIES_COLOURS[0]),
        Series("answered", xs, _cumulative([r["answered"] for r in rounds]), SERIES_COLOURS[2]),
        Series(SKIP_LABEL, xs, _cumulative([r["skipped"] for r in rounds]), SERIES_COLOURS[7]),
    ]))
    page.add("Progress", f'<div class="charts">{progress_chart}</div>')
    page.add("Rounds", table(
        ["round", "created (UTC)", "selection", "queried", "answered", SKIP_LABEL, "pending"],
        [[r["round"], r["created_at"][:19].replace("T", " "),
          ("coverage only" if r["coverage_only"] else r["strategy"]) + (" (forced)" if r["forced"] else ""),
          r["queried"], r["answered"], r["skipped"], r["pending"]] for r in rounds]))
    colours = ["#{:02x}{:02x}{:02x}".format(*c) for c in palette]
    bars = [(name, n, colours[i]) for i, (name, n) in enumerate(info["class_histogram"].items())]
    bars.append((SKIP_LABEL, info["skipped"], "#000000"))
    page.add("Class mix of the answers", legend(proj.classes, palette) + bar_chart("answers per class", bars))
    page.add("Imports (times)", table(
        ["import", "imported (UTC)", "format", "new", "unchanged", "replaced", "unanswered", "file"],
        [[i["id"], i["imported_at"][:19].replace("T", " "), i["format"], i["new"], i["unchanged"], i["replaced"],
          i["unanswered"], Path(i["file"]).name] for i in info["imports"]]) if info["imports"]
        else '<p class="note">No answers imported yet.</p>')
    page.add("Queried images", _previews(proj, count, predictions, progress))
    return page


def _previews(proj: Project, count: int, predictions: bool, progress: Progress | None) -> str:
    snap = proj.store.snapshot()
    if not snap.queries:
        return '<p class="note">No queries yet: run `sparseseg query`.</p>'
    latest = snap.rounds[-1].round
    by_image: dict[int, list[Marker]] = {}
    for q in snap.queries:
        answer = snap.answers.get(q.id)
        if answer is None:
            marker = Marker(q.y, q.x, PENDING, latest=q.round == latest)
        elif answer.class_id is None:
            marker = Marker(q.y, q.x, VOID, latest=q.round == latest)
        else:
            marker = Marker(q.y, q.x, ANSWERED, answer.class_id, q.round == latest)
        by_image.setdefault(q.image_id, []).append(marker)
    order = sorted(by_image, key=lambda i: (not any(m.latest for m in by_image[i]), i))[:count]
    head = None
    if predictions and (proj.root / HEAD_FILE).exists():
        head, _ = proj.head(snap, progress)  # head.pt when current (retrained only if answers changed since)
    palette = [list(c) for c in proj.meta.palette]
    cards = []
    for image in order:
        row = proj.image_rows[image]
        rgb = np.asarray(read_image(proj.root / DATA_DIR / SPLIT / "images" / f"{row.name}.png"))
        panels = [("points", with_markers(rgb, by_image[image], palette))]
        if head is not None:
            panels.append(("head's prediction", class_map(proj.predicted(head, image, progress)[0], palette)))
        cards.append(card("TRAINING image", row.name, panels))
    note = ("Prediction: the head trained on every answer (head.pt)." if head is not None else
            "No prediction: " + ("the project has no head.pt yet (`sparseseg train`)." if predictions
                                 else "--no-predictions."))
    return (legend(proj.classes, palette, marker_legend()) + f'<p class="note">{esc(note)} A labelling project '
            'has no test split (no ground truth), so only its own images are shown.</p>'
            + f'<div class="cards">{"".join(cards)}</div>')
