"""Answer files -> raw answers: Label Studio JSON exports, CVAT for images 1.1 XML, CSV.

A parser only reads and checks the file's own structure; whether an answer's pixel was queried,
its class exists and its project is this one is decided against the database by the caller.
Every problem is one line naming the file and where in it (task, region, image, line).

    Label Studio  the "JSON" export: a list of tasks, each with data.sparseseg_project,
                  data.image_name and annotations whose keypointlabels results are the answers
                  (x, y in percent of the image; the region id "q<query id>" is checked).
    CVAT          "CVAT for images 1.1": <image name width height> holding <points label points>;
                  a points shape still labelled "query" is not answered yet.
    CSV           a header with query_id and class (class by name; empty = not answered yet);
                  optional image, x, y (checked against the query), annotator, time.
"""

from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from sparseseg.annotate.coords import from_percent, from_pixels
from sparseseg.errors import SparsesegError

SKIP_LABEL = "unsure"  # the answer "cannot tell": recorded, never trained on
QUERY_LABEL = "query"  # CVAT placeholder label of a pre-placed point nobody has answered yet
RESERVED_LABELS = (SKIP_LABEL, QUERY_LABEL)
FORMATS = ("label-studio", "cvat", "csv")
_REGION_ID = re.compile(r"^q(\d+)$")  # our region ids; ids Label Studio makes for new points are random
_PROJECT_NAME = re.compile(r"sparseseg-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@dataclass(frozen=True)
class RawAnswer:
    """One answer as a file states it: a pixel (image, y, x) and/or a query id, and a label."""

    where: str  # for messages: "task 3 (image 'a'), region q17", "line 5"
    label: str | None  # None: the point is there but not answered yet
    image: str | None = None
    y: int | None = None
    x: int | None = None
    query_id: int | None = None
    annotator: str = ""
    time: str | None = None


@dataclass
class ParsedFile:
    format: str
    project_ids: set[str] = field(default_factory=set)  # the projects the file says it belongs to
    answers: list[RawAnswer] = field(default_factory=list)


def detect_format(path: Path, head: bytes) -> str:
    """From the suffix (.json, .xml, .csv), else from the first character."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "label-studio"
    if suffix == ".xml":
        return "cvat"
    if suffix in (".csv", ".txt"):
        return "csv"
    first = head.lstrip()[:1]
    return {b"[": "label-studio", b"{": "label-studio", b"<": "cvat"}.get(first, "csv")


def parse_file(path: Path, data: bytes, size: int, format: str | None = None) -> ParsedFile:
    """Parse an answer file's bytes; `size` is the project's image side (for coordinates)."""
    if not data.strip():
        raise SparsesegError(f"{path}: the file is empty")
    format = format or detect_format(path, data[:64])
    if format not in FORMATS:
        raise SparsesegError(f"--format {format!r} is not known; choose one of {', '.join(FORMATS)}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SparsesegError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    parse = {"label-studio": parse_label_studio, "cvat": parse_cvat, "csv": parse_csv}[format]
    return parse(text, path, size)


# ---------------------------------------------------------------------------- Label Studio
def _number(value: object, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SparsesegError(f"{path}: {where}: expected a number, got {value!r}")
    return float(value)


def _annotator(completed_by: object) -> str:
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id") or "")
    return "" if completed_by is None else str(completed_by)


def parse_label_studio(text: str, path: Path, size: int) -> ParsedFile:
    """A Label Studio "JSON" export (a list of tasks with their annotations)."""
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SparsesegError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); is the export truncated?"
        ) from None
    if not isinstance(tasks, list):
        raise SparsesegError(f"{path}: expected a list of tasks (Label Studio's 'JSON' export), got {type(tasks).__name__}")
    out = ParsedFile("label-studio")
    for n, task in enumerate(tasks, start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data", {}), dict):
            raise SparsesegError(f"{path}: task {n} is not a Label Studio task object")
        if "data" not in task:
            hint = " (this looks like a JSON-MIN export: export with the 'JSON' format)" if "sparseseg_project" in task else ""
            raise SparsesegError(f"{path}: task {n} has no 'data'{hint}")
        data = task["data"]
        project = data.get("sparseseg_project")
        image = data.get("image_name")
        if not isinstance(project, str) or not isinstance(image, str):
            raise SparsesegError(f"{path}: task {n} has no data.sparseseg_project / data.image_name: "
                                 "its tasks were not made by `sparseseg query`")
        out.project_ids.add(project)
        annotations = task.get("annotations", [])
        if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
            raise SparsesegError(f"{path}: task {n}: 'annotations' must be a list of objects")
        annotations = [a for a in annotations if not a.get("was_cancelled")]
        if any(a.get("ground_truth") for a in annotations):  # a reviewer's choice settles disagreements
            annotations = [a for a in annotations if a.get("ground_truth")]
        task_name = f"task {task.get('id', n)} (image {image!r})"
        for annotation in annotations:
            results = annotation.get("result", [])
            if not isinstance(results, list):
                raise SparsesegError(f"{path}: {task_name}: annotation 'result' must be a list")
            for result in results:
                if not isinstance(result, dict) or result.get("type") != "keypointlabels":
                    continue  # not a point answer (another control of an extended labelling config)
                out.answers.append(_ls_result(result, task_name, image, annotation, path, size))
    return out


def _ls_result(result: dict, task_name: str, image: str, annotation: dict, path: Path, size: int) -> RawAnswer:
    region = str(result.get("id", "?"))
    where = f"{task_name}, region {region}"
    value = result.get("value")
    if not isinstance(value, dict) or "x" not in value or "y" not in value:
        raise SparsesegError(f"{path}: {where}: keypoint without value.x / value.y")
    labels = value.get("keypointlabels", [])
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise SparsesegError(f"{path}: {where}: keypointlabels must be a list of class names")
    if len(labels) > 1:
        raise SparsesegError(f"{path}: {where}: one point carries {len(labels)} labels {labels}; give it one")
    match = _REGION_ID.match(region)
    return RawAnswer(
        where=where,
        label=labels[0] if labels else None,
        image=image,
        y=from_percent(_number(value["y"], where + " value.y", path), size),
        x=from_percent(_number(value["x"], where + " value.x", path), size),
        query_id=int(match.group(1)) if match else None,
        annotator=_annotator(annotation.get("completed_by")),
        time=annotation.get("updated_at") or annotation.get("created_at"),
    )


# ---------------------------------------------------------------------------- CVAT
def _int_attr(element: ET.Element, name: str, where: str, path: Path) -> int:
    try:
        value = int(element.get(name, ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise SparsesegError(f"{path}: {where}: attribute {name}={element.get(name)!r} must be a positive integer")
    return value


def parse_cvat(text: str, path: Path, size: int) -> ParsedFile:
    """A "CVAT for images 1.1" annotation export."""
    if re.search(r"<!(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise SparsesegError(f"{path}: XML with a DTD or entities is not accepted (CVAT exports have none)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise SparsesegError(f"{path}: not well-formed XML ({exc}); is the export truncated?") from None
    if root.tag != "annotations":
        raise SparsesegError(f"{path}: root element <{root.tag}>, expected <annotations> (CVAT for images 1.1)")
    out = ParsedFile("cvat")
    meta = root.find("meta")
    if meta is not None:
        for name in meta.iter("name"):
            match = _PROJECT_NAME.search(name.text or "")
            if match:
                out.project_ids.add(match.group(1))
    if root.find("track") is not None:
        raise SparsesegError(f"{path}: holds <track> elements (video mode); export the task as CVAT for images 1.1")
    for element in root.findall("image"):
        name = element.get("name")
        if not name:
            raise SparsesegError(f"{path}: an <image> has no name attribute")
        where_image = f"image {name!r}"
        width = _int_attr(element, "width", where_image, path)
        height = _int_attr(element, "height", where_image, path)
        stem = PurePosixPath(name.replace("\\", "/")).stem
        for k, shape in enumerate(element.findall("points"), start=1):
            label = shape.get("label")
            if not label:
                raise SparsesegError(f"{path}: {where_image}, points {k}: no label attribute")
            attrs = {a.get("name"): (a.text or "").strip() for a in shape.findall("attribute")}
            claimed = attrs.get("query_id") or None
            pairs = (shape.get("points") or "").split(";")
            for p, pair in enumerate(pairs, start=1):
                where = f"{where_image}, points {k}" + (f" point {p}" if len(pairs) > 1 else "")
                try:
                    cx, cy = (float(v) for v in pair.split(","))
                except ValueError:
                    raise SparsesegError(f"{path}: {where}: points={shape.get('points')!r} is not 'x,y[;x,y...]'") from None
                try:
                    query_id = int(claimed) if claimed is not None and len(pairs) == 1 else None
                except ValueError:
                    raise SparsesegError(f"{path}: {where}: query_id attribute {claimed!r} is not an integer") from None
                out.answers.append(RawAnswer(
                    where=where, label=None if label == QUERY_LABEL else label, image=stem,
                    y=from_pixels(cy, size, height), x=from_pixels(cx, size, width), query_id=query_id,
                ))
    return out


# ---------------------------------------------------------------------------- CSV
def _csv_int(row: dict, key: str, where: str, path: Path) -> int:
    try:
        return int(row[key].strip())
    except ValueError:
        raise SparsesegError(f"{path}: {where}: {key}={row[key]!r} is not an integer") from None


def parse_csv(text: str, path: Path, size: int) -> ParsedFile:
    """A CSV with a header: query_id, class (by name), and optionally image, x, y, annotator, time."""
    out = ParsedFile("csv")
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [k for k in ("query_id", "class") if k not in header]
        if missing:
            raise SparsesegError(f"{path}: CSV header {header} lacks {', '.join(missing)} (expected query_id,class)")
        has_pixel = all(k in header for k in ("image", "x", "y"))
        for row in reader:
            where = f"line {reader.line_num}"
            if "\0extra" in row:
                raise SparsesegError(f"{path}: {where}: more fields than the header's {len(header)}")
            if any(v is None for v in row.values()):
                raise SparsesegError(f"{path}: {where}: fewer fields than the header's {len(header)}; is the file truncated?")
            label = row["class"].strip()
            answer = RawAnswer(where=where, label=label or None, query_id=_csv_int(row, "query_id", where, path),
                               annotator=(row.get("annotator") or "").strip(), time=(row.get("time") or "").strip() or None)
            if has_pixel:
                answer = replace(answer, image=row["image"].strip(), y=_csv_int(row, "y", where, path),
                                 x=_csv_int(row, "x", where, path))
            out.answers.append(answer)
    except csv.Error as exc:
        raise SparsesegError(f"{path}: malformed CSV at line {reader.line_num} ({exc})") from None
    return out
