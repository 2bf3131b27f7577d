"""connect, push, pull: a project and a live Label Studio project, kept in step through its HTTP API.

    connect  creates (or finds again) the Label Studio project with our labelling config, adds the
             local-files storage that serves the project's images, and records the link (URL and
             project id, never the token) in the database.
    push     a round's queries as tasks, one per image: the pre-placed points and, once a head
             exists, its mask as pre-annotations. A task is made once: the database records every
             pushed task id, and tasks already on the server (a push that died before recording)
             are found by their data and recorded instead of made again.
    pull     the submitted annotations of our tasks, written as a Label Studio JSON export under
             PROJECT/labelstudio/ and imported by `Project.import_file` (all or nothing, as any
             import; the same answers again change nothing).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparseseg.annotate.export import (
    MASK_NAME,
    MODEL_VERSION,
    TO_NAME,
    label_studio_config,
    label_studio_tasks,
)
from sparseseg.annotate.labelstudio.brush import mask_rle
from sparseseg.annotate.labelstudio.client import LabelStudio
from sparseseg.annotate.layout import DATA_DIR, SPLIT
from sparseseg.annotate.project import ImportResult, Project
from sparseseg.annotate.store import LabelStudioLink
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write_text

PULL_DIR = "labelstudio"  # PROJECT/labelstudio/pull-<sha>.json: what each pull imported
LOCAL_FILES = "/data/local-files/?d="  # image_url prefix served by a local-files storage
Progress = Callable[[str, int, int], None]


def project_title(project: Project) -> str:
    return f"sparseseg {project.root.name}"


def project_description(project: Project) -> str:
    """Carries the project id: how `connect` finds its Label Studio project again."""
    return f"sparseseg project {project.project_id}: point queries of active learning (docs/annotation.md)"


def _link(project: Project) -> LabelStudioLink:
    link = project.store.ls_link()
    if link is None:
        raise SparsesegError(f"{project.root}: not connected to Label Studio; run `sparseseg labelstudio connect "
                             f"{project.root} --url URL` first")
    return link


# ---------------------------------------------------------------------------- connect
@dataclass
class ConnectResult:
    link: LabelStudioLink
    created: bool  # a new Label Studio project (else an existing one was reused)
    user: str
    storage_path: str | None


def connect(project: Project, client: LabelStudio, title: str | None = None,
            storage_path: str | None = None) -> ConnectResult:
    """Create or reuse the Label Studio project of `project` and record the link.

    Reused, in this order: the linked project when it still exists on this server, else a project
    whose description names this project's id. Its labelling config is brought up to date.

    Args:
        storage_path: the images folder as the Label Studio server sees it (default: this project's
            `data/train/images`, absolute); only used when `image_url` is a local-files address.
    """
    user = client.whoami()
    config = label_studio_config(project.classes, project.meta.palette, masks=True)
    link = project.store.ls_link()
    found = None
    if link is not None and link.url == client.url:
        found = next((p for p in client.projects() if p.get("id") == link.project), None)
    if found is None:
        found = next((p for p in client.projects() if project.project_id in (p.get("description") or "")), None)
    created = found is None
    if created:
        found = client.post("/api/projects/", {
            "title": title or project_title(project), "description": project_description(project),
            "label_config": config, "show_collab_predictions": True, "model_version": MODEL_VERSION})
    elif found.get("label_config") != config:
        client.patch(f"/api/projects/{found['id']}/", {"label_config": config})
    pid = int(found["id"])
    storage, path = None, None
    if project.config.image_url.startswith(LOCAL_FILES):
        path = storage_path or str((project.root / DATA_DIR / SPLIT / "images").resolve())
        storages = client.get("/api/storages/localfiles/", project=pid)
        mine = next((s for s in storages if s.get("path") == path), None)
        if mine is None:
            mine = client.post("/api/storages/localfiles/", {"project": pid, "path": path, "title": "sparseseg images",
                                                             "use_blob_urls": False})
        storage = int(mine["id"])
    with project.store.write():
        link = project.store.set_ls_link(client.url, pid, storage)
    name = user.get("email") or user.get("username") or str(user.get("id", "?"))
    return ConnectResult(link, created, name, path)


# ---------------------------------------------------------------------------- push
@dataclass
class PushResult:
    round: int
    created: list[int] = field(default_factory=list)  # task ids made now
    recovered: list[int] = field(default_factory=list)  # already on the server, recorded now
    already: int = 0  # tasks of this round recorded before
    missing: list[int] = field(default_factory=list)  # recorded, but no longer on the server
    predicted: bool = False  # the head's masks went with the new tasks


def mask_regions(ids: np.ndarray, confidence: np.ndarray, classes: list[str], round: int) -> tuple[list[dict], float]:
    """One brush region per predicted class, and the prediction's score (mean top-class probability)."""
    size = ids.shape[0]
    regions = []
    for c in np.unique(ids).tolist():
        regions.append({
            "id": f"m{round}_{c}", "from_name": MASK_NAME, "to_name": TO_NAME, "type": "brushlabels",
            "original_width": size, "original_height": size, "image_rotation": 0, "readonly": True,
            "value": {"format": "rle", "rle": mask_rle(ids == c), "brushlabels": [classes[c]]},
        })
    return regions, round_score(float(confidence.mean()))


def round_score(value: float) -> float:
    return float(f"{value:.4f}")


def push(project: Project, client: LabelStudio, round: int | None = None, masks: bool = True,
         progress: Progress | None = None) -> PushResult:
    """Push round `round`'s queries (default: the latest round) as tasks, each exactly once.

    With `masks` and a head (some answer to train on), each new task's prediction also holds the
    head's mask of its image (`mask_regions`), so the annotator sees what the model thinks.
    """
    link = _link(project)
    snap = project.store.snapshot()
    if not snap.rounds:
        raise SparsesegError(f"{project.root}: no round yet; run `sparseseg query {project.root}` first")
    round = round if round is not None else snap.rounds[-1].round
    queries = project.round_queries(round)
    tasks = {t["data"]["image_name"]: t for t in label_studio_tasks(project.project_id, round, project.size, queries,
                                                                    project.config.image_url)}
    image_ids = {r.name: r.id for r in project.image_rows}
    names = {r.id: r.name for r in project.image_rows}
    recorded = {t.image_id: t for t in project.store.ls_tasks(link.id) if t.round == round}
    on_server = {}
    for task in client.tasks(link.project):
        data = task.get("data") or {}
        if data.get("sparseseg_project") == project.project_id:
            on_server[(data.get("round"), data.get("image_name"))] = task
    out = PushResult(round)
    out.missing = [t.task for t in recorded.values() if (round, names[t.image_id]) not in on_server]
    out.already = len(recorded)
    todo = [name for name in tasks if image_ids[name] not in recorded]
    head = None
    if masks and todo:
        head, _ = project.head(progress=progress)
    out.predicted = head is not None
    for n, name in enumerate(todo, start=1):
        task = tasks[name]
        prediction = task["predictions"][0]
        if head is not None:
            ids, top = project.predicted(head, image_ids[name], progress)
            regions, score = mask_regions(ids.numpy(), top.numpy(), project.classes, round)
            prediction = {**prediction, "result": prediction["result"] + regions, "score": score}
        existing = on_server.get((round, name))
        if existing is None:
            made = client.post("/api/tasks/", {"project": link.project, "data": task["data"]})
            task_id = int(made["id"])
            out.created.append(task_id)
        else:  # made by a push that stopped before recording it
            task_id = int(existing["id"])
            out.recovered.append(task_id)
        if existing is None or not existing.get("total_predictions"):
            client.post("/api/predictions/", {"task": task_id, **prediction})
        with project.store.write():
            project.store.add_ls_task(link.id, task_id, round, image_ids[name], head is not None)
        if progress:
            progress("pushing", n, len(todo))
    return out


# ---------------------------------------------------------------------------- pull
@dataclass
class PullResult:
    tasks: int  # our tasks with at least one submitted annotation
    file: Path | None = None
    imported: ImportResult | None = None


ANNOTATION_KEYS = ("id", "completed_by", "result", "was_cancelled", "ground_truth", "created_at", "updated_at")


def answers_export(export: list[dict], task_ids: set[int]) -> list[dict]:
    """Our annotated tasks of a Label Studio JSON export, reduced to what the importer reads.

    Only keypoint results are kept (the mask pre-annotations an annotator submits along are not
    answers), and keys are sorted, so the same answers always give the same bytes.
    """
    out = []
    for task in export:
        if task.get("id") not in task_ids:
            continue
        annotations = [{k: a.get(k) for k in ANNOTATION_KEYS} for a in task.get("annotations") or []
                       if not a.get("was_cancelled")]
        for a in annotations:
            a["result"] = [r for r in a["result"] or [] if isinstance(r, dict) and r.get("type") == "keypointlabels"]
        if annotations:
            out.append({"id": task["id"], "data": task.get("data"), "annotations": annotations})
    return sorted(out, key=lambda t: t["id"])


def pull(project: Project, client: LabelStudio, replace: bool = False) -> PullResult:
    """Fetch the submitted annotations of every pushed task and import them (all or nothing).

    The answers are written to PROJECT/labelstudio/pull-<sha256 prefix>.json first, so the
    database's `imports` table names a file that holds exactly what was imported.
    """
    link = _link(project)
    pushed = {t.task for t in project.store.ls_tasks(link.id)}
    if not pushed:
        return PullResult(0)
    raw = client.request("GET", f"/api/projects/{link.project}/export", params={"exportType": "JSON"}, raw=True)
    try:
        export = json.loads(raw)
    except ValueError:
        raise SparsesegError(f"{client.url}: the export of project {link.project} is not JSON") from None
    if not isinstance(export, list):
        raise SparsesegError(f"{client.url}: the export of project {link.project} is not a list of tasks")
    tasks = answers_export(export, pushed)
    if not tasks:
        return PullResult(0)
    text = json.dumps(tasks, sort_keys=True, indent=1) + "\n"
    path = project.root / PULL_DIR / f"pull-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, text)
    return PullResult(len(tasks), path, project.import_file(path, format="label-studio", replace=replace))
