"""A round's queries as files an annotation tool reads: Label Studio, CVAT, CSV.

Every file carries what makes the way back exact: the query id (Label Studio region id "q<id>"
and task data; CVAT attribute query_id; CSV column) and the project id (Label Studio task data;
CVAT task name "sparseseg-<project id>-round-<r>"). Coordinates follow `coords.py`.
"""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from sparseseg.annotate.coords import to_percent, to_pixels
from sparseseg.annotate.importers import QUERY_LABEL, SKIP_LABEL

FROM_NAME = "label"  # the KeyPointLabels control of the labelling config
TO_NAME = "image"  # its Image object; tasks give the address in data.image
MASK_NAME = "model"  # the BrushLabels control that shows the head's masks (live Label Studio loop only)
MODEL_VERSION = "sparseseg"  # pre-placed points are "predictions" of this model version in Label Studio
SKIP_COLOUR = "#000000"
QUERY_COLOUR = "#ffffff"


@dataclass(frozen=True)
class Query:
    """One queried pixel, for export."""

    id: int
    image: str  # image name (file stem)
    y: int
    x: int


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _xml_text(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def label_studio_config(classes: Sequence[str], palette: Sequence[Sequence[int]], masks: bool = False) -> str:
    """The labelling config: the image and one KeyPointLabels control with every class and the skip label.

    With `masks`, a BrushLabels control MASK_NAME as well, which shows the current head's masks sent
    as pre-annotations (`sparseseg labelstudio push`); answers are read from the keypoints only.
    """
    view = ET.Element("View")
    hint = " The tinted areas are the model's current guess, for reference only." if masks else ""
    ET.SubElement(view, "Header", value=f"Give every point the class of the pixel under it; '{SKIP_LABEL}' "
                                        f"when you cannot tell. Do not move the points.{hint}")
    ET.SubElement(view, "Image", name=TO_NAME, value="$image", zoom="true", zoomControl="true")
    control = ET.SubElement(view, "KeyPointLabels", name=FROM_NAME, toName=TO_NAME, strokeWidth="1")
    for name, colour in zip(classes, palette, strict=True):
        ET.SubElement(control, "Label", value=name, background=hex_colour(colour))
    ET.SubElement(control, "Label", value=SKIP_LABEL, background=SKIP_COLOUR)
    if masks:
        brush = ET.SubElement(view, "BrushLabels", name=MASK_NAME, toName=TO_NAME)
        for name, colour in zip(classes, palette, strict=True):
            ET.SubElement(brush, "Label", value=name, background=hex_colour(colour))
    ET.indent(view, space="  ")
    return ET.tostring(view, encoding="unicode") + "\n"


def label_studio_tasks(project_id: str, round: int, size: int, queries: Sequence[Query], image_url: str) -> list[dict]:
    """One task per image: its queried pixels as pre-placed, unlabelled keypoints (predictions).

    The task data repeats the queries (id, y, x) so the export can be checked against them by eye.
    """
    by_image: dict[str, list[Query]] = {}
    for q in queries:
        by_image.setdefault(q.image, []).append(q)
    width = max(100.0 / size, 0.5)  # the drawn point's radius, in percent; cosmetic only
    tasks = []
    for image, qs in sorted(by_image.items()):
        regions = [{
            "id": f"q{q.id}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "keypointlabels",
            "original_width": size, "original_height": size, "image_rotation": 0,
            "value": {"x": to_percent(q.x, size), "y": to_percent(q.y, size), "width": width, "keypointlabels": []},
        } for q in qs]
        tasks.append({
            "data": {"image": image_url.format(file=f"{image}.png", name=image), "image_name": image,
                     "sparseseg_project": project_id, "round": round,
                     "queries": [{"query_id": q.id, "y": q.y, "x": q.x} for q in qs]},
            "predictions": [{"model_version": MODEL_VERSION, "result": regions}],
        })
    return tasks


def cvat_xml(project_id: str, round: int, size: int, classes: Sequence[str], palette: Sequence[Sequence[int]],
             queries: Sequence[Query], image_ids: dict[str, int]) -> str:
    """CVAT for images 1.1 annotations: each query a points shape labelled "query" with a query_id attribute."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = f"sparseseg-{project_id}-round-{round}"
    images = sorted({q.image for q in queries})
    ET.SubElement(task, "size").text = str(len(images))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    colours = [hex_colour(c) for c in palette] + [SKIP_COLOUR, QUERY_COLOUR]
    for name, colour in zip([*classes, SKIP_LABEL, QUERY_LABEL], colours, strict=True):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = colour
        ET.SubElement(label, "type").text = "points"
        attribute = ET.SubElement(ET.SubElement(label, "attributes"), "attribute")
        for key, value in (("name", "query_id"), ("mutable", "False"), ("input_type", "text"),
                           ("default_value", ""), ("values", "")):
            ET.SubElement(attribute, key).text = value
    for image in images:
        element = ET.SubElement(root, "image", id=str(image_ids[image]), name=f"{image}.png", width=str(size),
                                height=str(size))
        for q in (q for q in queries if q.image == image):
            points = f"{to_pixels(q.x, size, size):.2f},{to_pixels(q.y, size, size):.2f}"
            shape = ET.SubElement(element, "points", label=QUERY_LABEL, source="manual", occluded="0",
                                  points=points, z_order="0")
            ET.SubElement(shape, "attribute", name="query_id").text = str(q.id)
    return _xml_text(root)


def queries_csv(queries: Sequence[Query]) -> str:
    """query_id,image,x,y (pixel column x and row y of the project's image)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["query_id", "image", "x", "y"])
    for q in queries:
        writer.writerow([q.id, q.image, q.x, q.y])
    return out.getvalue()


def tasks_json(tasks: list[dict]) -> str:
    return json.dumps(tasks, indent=1) + "\n"
