"""Labelling real images: init, query, export, import (Label Studio, CVAT, CSV), train, predict, status.

The annotator is simulated from a synthetic dataset's masks; the exports an annotation tool would
return are built from our own exported files, the way the tool changes them (labels filled in).
Every refused file must leave the database exactly as it was; a killed import or query too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sparseseg.annotate.coords import from_percent, from_pixels, to_percent, to_pixels
from sparseseg.annotate.init import init_project
from sparseseg.annotate.layout import STRATEGY_CACHE_FILE, round_dir
from sparseseg.annotate.project import Project
from sparseseg.annotate.store import DB_FILE, PAUSE_ENV
from sparseseg.cli import app
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from sparseseg.errors import SparsesegError
from tests.conftest import save_tiny_adm

SIZE = 32
SETTINGS = ["budget=4", "strategy.candidates_per_image=64", "strategy.k_per_image=5", "strategy.noise_samples=2",
            "head.epochs=20", "backbone.device=cpu"]
runner = CliRunner()


# ---------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images (with the masks our simulated annotator reads), a classes file and a tiny random ADM."""
    root = tmp_path_factory.mktemp("world")
    make_synthetic(root / "synthetic", n_train=6, n_test=1, size=SIZE, seed=3)
    images = root / "synthetic" / "train" / "images"
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    ckpt = save_tiny_adm(root / "adm.pt", SIZE)
    masks = {p.stem: np.asarray(Image.open(p)) for p in (root / "synthetic" / "train" / "masks").iterdir()}
    return {"root": root, "images": images, "classes": root / "classes.txt", "ckpt": ckpt, "masks": masks}


@pytest.fixture(scope="module")
def base(world):
    """A project after its first query round (copied by the tests that change it)."""
    path = world["root"] / "base"
    proj = init_project(path, world["images"], world["classes"], size=SIZE, overrides=SETTINGS,
                        backbone={"checkpoint": str(world["ckpt"])})
    proj.query()
    proj.close()
    return path


@pytest.fixture
def project(base, tmp_path):
    path = tmp_path / "project"
    shutil.copytree(base, path)
    proj = Project(path)
    yield proj
    proj.close()


def truth(world, image: str, y: int, x: int) -> str:
    return SYNTHETIC_CLASSES[int(world["masks"][image][y, x])]


def queries(proj: Project, round: int = 1) -> list[dict]:
    rows = (round_dir(proj.root, round) / "queries.csv").read_text().splitlines()[1:]
    return [dict(zip(("query_id", "image", "x", "y"), (int(a), b, int(c), int(d)), strict=True))
            for a, b, c, d in (r.split(",") for r in rows)]


def stored(proj: Project) -> dict[int, tuple[str, int, int, str | None]]:
    """query id -> (image, y, x, class or None for skip) of every current answer."""
    conn = sqlite3.connect(proj.root / DB_FILE)
    rows = conn.execute("SELECT query_id, image, y, x, class, skip FROM labelled_pixels").fetchall()
    conn.close()
    return {q: (i, y, x, None if skip else c) for q, i, y, x, c, skip in rows}


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path / DB_FILE)
    lines = list(conn.iterdump())
    conn.close()
    return lines


def label_studio_export(proj: Project, round: int, answer) -> list[dict]:
    """What Label Studio's JSON export holds after an annotator labelled every pre-placed point.

    `answer(region, task)` returns the label list to put on a region (or None to leave it out).
    """
    tasks = json.loads((round_dir(proj.root, round) / "tasks.json").read_text())
    out = []
    for n, task in enumerate(tasks, start=1):
        result = []
        for region in task["predictions"][0]["result"]:
            labels = answer(region, task)
            if labels is not None:
                result.append({**region, "value": {**region["value"], "keypointlabels": labels}})
        out.append({"id": n, "data": task["data"], "predictions": [n], "annotations": [{
            "id": n, "completed_by": 7, "result": result, "was_cancelled": False, "ground_truth": False,
            "created_at": "2026-01-02T03:04:05Z", "updated_at": "2026-01-02T03:04:06Z"}]})
    return out


def region_pixel(region: dict) -> tuple[int, int]:
    return from_percent(region["value"]["y"], SIZE), from_percent(region["value"]["x"], SIZE)


def truthful(world):
    def answer(region, task):
        y, x = region_pixel(region)
        return [truth(world, task["data"]["image_name"], y, x)]
    return answer


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------- coordinates
@pytest.mark.parametrize("size", [1, 7, 32, 255, 256, 1000, 4096])
def test_pixel_centres_round_trip_exactly(size):
    idx = np.arange(size)
    assert all(from_percent(to_percent(i, size), size) == i for i in idx)
    for extent in (size, 3 * size + 1, 1920, 17):
        assert all(from_pixels(to_pixels(i, size, extent), size, extent) == i for i in idx)


# ---------------------------------------------------------------------------- init
def test_init_writes_a_project_with_its_own_id(world, base):
    proj = Project(base)
    assert uuid.UUID(proj.project_id)
    assert proj.classes == SYNTHETIC_CLASSES and proj.size == SIZE
    images = sorted((base / "data" / "train" / "images").iterdir())
    assert [p.stem for p in images] == sorted(p.stem for p in world["images"].iterdir())
    assert all(Image.open(p).size == (SIZE, SIZE) for p in images)
    assert proj.config.budget == 4 and proj.config.backbone.checkpoint == world["ckpt"]
    tables = {r[0] for r in sqlite3.connect(base / DB_FILE).execute("SELECT name FROM sqlite_master")}
    assert {"meta", "classes", "images", "rounds", "queries", "imports", "answers", "labelled_pixels"} <= tables
    proj.close()


def test_init_refuses_bad_input_before_writing_anything(world, tmp_path):
    args = dict(images=world["images"], classes_file=world["classes"], size=SIZE,
                backbone={"checkpoint": str(world["ckpt"])})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(SparsesegError, match="not an empty folder"):
        init_project(tmp_path / "busy", **args)
    reserved = tmp_path / "reserved.txt"
    reserved.write_text("road\nunsure\n")
    with pytest.raises(SparsesegError, match="'unsure' is reserved"):
        init_project(tmp_path / "p1", **{**args, "classes_file": reserved})
    with pytest.raises(SparsesegError, match="backbone.checkpoint is required"):
        init_project(tmp_path / "p2", **args, overrides=["backbone.checkpoint=null"])
    with pytest.raises(SparsesegError, match="strategy.nope"):
        init_project(tmp_path / "p3", **args, overrides=["strategy.nope=1"])
    assert not any((tmp_path / p).exists() for p in ("p1", "p2", "p3"))
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["x.txt"]


def test_a_project_needs_no_backbone_and_gets_the_strategy_that_fits(world, tmp_path):
    # Without --backbone: the EfficientNet-Lite0 shipped with the package, and two-stage eBALD with
    # MC dropout in the head (the counterpart of eDALD on a backbone without noise samples).
    proj = init_project(tmp_path / "photos", world["images"], world["classes"], size=SIZE,
                        overrides=[s for s in SETTINGS if not s.startswith("strategy.noise")])
    cfg = proj.config
    assert (cfg.backbone.name, cfg.strategy.name, cfg.head.dropout) == ("efficientnet_lite0", "two_stage_ebald", 0.1)
    first = proj.query()
    assert first.queries == 4 and first.coverage_only
    ids = [int(line.split(",")[0]) for line in (round_dir(proj.root, 1) / "queries.csv").read_text().splitlines()[1:]]
    answers = tmp_path / "answers.csv"
    answers.write_text("query_id,class\n" + "".join(f"{i},{SYNTHETIC_CLASSES[k % 3]}\n" for k, i in enumerate(ids)))
    proj.import_file(answers)
    second = proj.query()  # eBALD on MC-dropout samples of the head trained on the answers
    assert second.queries == 4 and not second.coverage_only
    proj.close()


# ---------------------------------------------------------------------------- query and export
def test_first_round_exports_every_format_at_the_queried_pixels(base):
    proj = Project(base)
    snap = proj.store.snapshot()
    assert [r.round for r in snap.rounds] == [1] and snap.rounds[0].info["coverage_only"] is True
    names = {r.id: r.name for r in proj.image_rows}
    expected = {q.id: (names[q.image_id], q.y, q.x) for q in snap.queries}
    assert len(expected) == 4
    out = round_dir(base, 1)
    assert {q["query_id"]: (q["image"], q["y"], q["x"]) for q in queries(proj)} == expected
    # Label Studio: one task per image, regions at the pixel centres, ids and project in the data
    tasks = json.loads((out / "tasks.json").read_text())
    seen = {}
    for task in tasks:
        assert task["data"]["sparseseg_project"] == proj.project_id
        for region, q in zip(task["predictions"][0]["result"], task["data"]["queries"], strict=True):
            assert region["id"] == f"q{q['query_id']}" and region["value"]["keypointlabels"] == []
            assert region["value"]["x"] == pytest.approx(100 * (q["x"] + 0.5) / SIZE)
            seen[q["query_id"]] = (task["data"]["image_name"], *region_pixel(region))
    assert seen == expected
    config = ET.fromstring((out / "label_config.xml").read_text())
    assert [e.get("value") for e in config.iter("Label")] == [*SYNTHETIC_CLASSES, "unsure"]
    # CVAT: points at pixel centres labelled "query", with the query id attribute
    cvat = ET.fromstring((out / "cvat.xml").read_text())
    assert proj.project_id in cvat.find("meta/task/name").text
    points = {int(p.find("attribute").text): (Path(img.get("name")).stem, p.get("points"), p.get("label"))
              for img in cvat.iter("image") for p in img.iter("points")}
    assert {k: (v[0], v[1], "query") for k, v in points.items()} == {
        k: (img, f"{x + 0.5:.2f},{y + 0.5:.2f}", "query") for k, (img, y, x) in expected.items()}
    # review: one PNG per image with queries, enlarged
    reviews = sorted((out / "review").iterdir())
    assert [p.stem for p in reviews] == sorted({v[0] for v in expected.values()})
    assert Image.open(reviews[0]).size == (512, 512)
    proj.close()


def test_pending_queries_refuse_a_new_round_unless_forced_and_are_never_requeried(world, project):
    with pytest.raises(SparsesegError, match=r"4 queried pixel\(s\) of round\(s\) 1 have no answer yet.*--force"):
        project.query()
    first = {(q["image"], q["y"], q["x"]) for q in queries(project)}
    result = project.query(force=True, budget=5)
    assert result.round == 2 and result.queries == 5 and result.coverage_only
    second = {(q["image"], q["y"], q["x"]) for q in queries(project, 2)}
    assert len(second) == 5 and not first & second
    assert project.status()["rounds"][1]["forced"] is True


def test_label_studio_round_trip_stores_each_answer_at_its_queried_pixel(world, project, tmp_path):
    export = write_json(tmp_path / "ls.json", label_studio_export(project, 1, truthful(world)))
    result = project.import_file(export)
    assert (result.format, result.new, result.unanswered) == ("label-studio", 4, 0)
    expected = {q["query_id"]: (q["image"], q["y"], q["x"], truth(world, q["image"], q["y"], q["x"]))
                for q in queries(project)}
    assert stored(project) == expected
    conn = sqlite3.connect(project.root / DB_FILE)
    assert {r for r in conn.execute("SELECT source, annotator, answered_at FROM answers")} == {
        ("label-studio", "7", "2026-01-02T03:04:06Z")}
    # the same file again, or another with the same answers, changes nothing
    before = dump(project.root)
    again = project.import_file(export)
    assert again.already is not None and again.already[0] == result.import_id
    assert dump(project.root) == before
    other = write_json(tmp_path / "ls2.json", label_studio_export(project, 1, truthful(world)) + [])
    other.write_text(other.read_text() + "\n")
    assert project.import_file(other).unchanged == 4
    assert stored(project) == expected
    # then two-stage eDALD runs with a head trained on those answers
    second = project.query()
    assert second.round == 2 and not second.coverage_only
    round1 = {(q["image"], q["y"], q["x"]) for q in queries(project)}
    assert not round1 & {(q["image"], q["y"], q["x"]) for q in queries(project, 2)}


def test_the_strategy_cache_skips_unchanged_images_and_changes_no_pick(world, project, tmp_path, monkeypatch):
    """Round 2 re-herds only the images that got answers; the picks equal a query without the cache."""
    from sparseseg.selection import strategies

    project.import_file(write_json(tmp_path / "ls.json", label_studio_export(project, 1, truthful(world))))
    cache = project.root / STRATEGY_CACHE_FILE
    assert cache.is_file()  # written by the first query
    # twins without a usable cache: a damaged file, and one written for other settings or images
    damaged, other = tmp_path / "damaged", tmp_path / "other"
    for root in (damaged, other):
        shutil.copytree(project.root, root)
    (damaged / STRATEGY_CACHE_FILE).write_text("{not json")
    (other / STRATEGY_CACHE_FILE).write_text(json.dumps({**json.loads(cache.read_text()), "fingerprint": "x"}))
    calls = []
    herd = strategies.max_herding
    monkeypatch.setattr(strategies, "max_herding", lambda z, k, *a, **kw: calls.append(len(z)) or herd(z, k, *a, **kw))

    def second_round(proj: Project) -> tuple[int, list[tuple[str, int, int]]]:
        calls.clear()
        proj.query()
        return len(calls), [(q["image"], q["y"], q["x"]) for q in queries(proj, 2)]

    answered = len({q["image"] for q in queries(project)})
    images = len(list(world["images"].iterdir()))
    cached, picks = second_round(project)
    assert cached == answered + 1 < images + 1  # local herding of the answered images, then the global stage
    for root in (damaged, other):
        twin = Project(root)
        try:
            assert second_round(twin) == (images + 1, picks)
        finally:
            twin.close()


def test_cvat_and_csv_round_trips_and_the_skip_answer(world, project, tmp_path):
    qs = queries(project)
    # CVAT: the annotator relabels every point but the last (left as "query": not answered yet)
    tree = ET.parse(round_dir(project.root, 1) / "cvat.xml")
    points = [(img, p) for img in tree.getroot().iter("image") for p in img.iter("points")]
    for img, p in points[:-1]:
        x, y = (from_pixels(float(v), SIZE, SIZE) for v in p.get("points").split(","))
        p.set("label", truth(world, Path(img.get("name")).stem, y, x))
    tree.write(tmp_path / "cvat.xml")
    result = project.import_file(tmp_path / "cvat.xml")
    assert (result.format, result.new, result.unanswered) == ("cvat", 3, 1)
    last = int(points[-1][1].find("attribute").text)
    # CSV: the last one is "unsure"; a row left empty stays pending
    (tmp_path / "answers.csv").write_text(f"query_id,class\n{last},unsure\n{qs[0]['query_id']},\n")
    result = project.import_file(tmp_path / "answers.csv")
    assert (result.format, result.new, result.skips) == ("csv", 1, 1)
    got = stored(project)
    assert len(got) == 4 and got[last][3] is None
    for q in qs:
        if q["query_id"] != last:
            assert got[q["query_id"]] == (q["image"], q["y"], q["x"], truth(world, q["image"], q["y"], q["x"]))
    status = project.status()
    assert status["totals"] == {"queried": 4, "answered": 3, "skipped": 1, "pending": 0}
    assert sum(status["class_histogram"].values()) == 3 and status["skipped"] == 1
    # skips are recorded but never trained on
    trained = project.train()
    assert trained.pixels == 3 and trained.retrained and (project.root / "head.pt").exists()
    assert project.train().retrained is False


def test_a_changed_answer_needs_replace_and_keeps_the_old_one(world, project, tmp_path):
    q = queries(project)[0]
    first = tmp_path / "first.csv"
    first.write_text(f"query_id,class\n{q['query_id']},road\n")
    project.import_file(first)
    second = tmp_path / "second.csv"
    second.write_text(f"query_id,class,image,x,y,annotator\n{q['query_id']},sky,{q['image']},{q['x']},{q['y']},bea\n")
    before = dump(project.root)
    with pytest.raises(SparsesegError, match="already answered 'road'.*says 'sky': pass --replace"):
        project.import_file(second)
    assert dump(project.root) == before
    assert project.import_file(second, replace=True).replaced == 1
    assert stored(project)[q["query_id"]][3] == "sky"
    history = sqlite3.connect(project.root / DB_FILE).execute(
        "SELECT class_id, annotator, current FROM answers ORDER BY id").fetchall()
    assert history == [(1, "", 0), (0, "bea", 1)]


# ---------------------------------------------------------------------------- refused files
def _bad_files(world, proj: Project, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message) for every kind of file that must be refused."""
    qs = queries(proj)
    ok = label_studio_export(proj, 1, truthful(world))
    files: dict[str, tuple[Path, str]] = {}

    def add(name, text, message, suffix=".json"):
        path = tmp / f"{name}{suffix}"
        path.write_text(text if isinstance(text, str) else json.dumps(text))
        files[name] = (path, message)

    moved = json.loads(json.dumps(ok))
    region = moved[0]["annotations"][0]["result"][0]
    region["value"]["x"] = to_percent((from_percent(region["value"]["x"], SIZE) + 1) % SIZE, SIZE)
    add("moved", moved, "was never queried; query .* was the point moved")
    drawn = json.loads(json.dumps(ok))
    extra = {**drawn[0]["annotations"][0]["result"][0], "id": "new1"}
    extra["value"] = {**extra["value"], "x": to_percent(0, SIZE), "y": to_percent(0, SIZE)}
    drawn[0]["annotations"][0]["result"].append(extra)
    if not any((q["image"], q["y"], q["x"]) == (drawn[0]["data"]["image_name"], 0, 0) for q in qs):
        add("never_queried", drawn, r"pixel \(y=0, x=0\) .* was never queried")
    unknown = json.loads(json.dumps(ok))
    unknown[-1]["annotations"][0]["result"][0]["value"]["keypointlabels"] = ["lamppost"]
    add("unknown_class", unknown, "class 'lamppost' is not in the project")
    foreign = json.loads(json.dumps(ok))
    foreign[0]["data"]["sparseseg_project"] = str(uuid.uuid4())
    add("other_project", foreign, "made for project .* but this project is")
    add("truncated_json", json.dumps(ok)[:-40], "not valid JSON .* truncated")
    add("not_a_list", {"tasks": ok}, "expected a list of tasks")
    add("no_project", [{"id": 1, "data": {"image": "x"}, "annotations": []}], "not made by `sparseseg query`")
    two = json.loads(json.dumps(ok))
    twin = json.loads(json.dumps(two[0]["annotations"][0]))
    twin["result"][0]["value"]["keypointlabels"] = ["car" if twin["result"][0]["value"]["keypointlabels"] != ["car"]
                                                    else "sky"]
    two[0]["annotations"].append(twin)
    add("disagreement", two, "resolve the disagreement")
    cvat = (round_dir(proj.root, 1) / "cvat.xml").read_text()
    add("truncated_xml", cvat[: len(cvat) // 2], "not well-formed XML .* truncated", ".xml")
    add("cvat_other_project", cvat.replace(proj.project_id, str(uuid.uuid4())), "made for project", ".xml")
    add("cvat_unknown_image", cvat.replace(f'name="{qs[0]["image"]}.png"', 'name="elsewhere.png"', 1),
        "image 'elsewhere' is not in this project", ".xml")
    add("cvat_dtd", '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "x">]><annotations/>', "DTD", ".xml")
    q = qs[0]
    add("csv_truncated", f"query_id,class,image,x,y\n{q['query_id']},road,{q['image']}", "fewer fields .* truncated",
        ".csv")
    add("csv_header", "id,label\n1,road\n", "lacks query_id, class", ".csv")
    add("csv_no_query", "query_id,class\n999,road\n", "query 999 does not exist", ".csv")
    add("csv_mismatch", f"query_id,class,image,x,y\n{q['query_id']},road,{q['image']},{(q['x'] + 1) % SIZE},{q['y']}\n",
        "was never queried|says query", ".csv")
    add("csv_bad_int", "query_id,class\nseven,road\n", "query_id='seven' is not an integer", ".csv")
    add("empty", "", "the file is empty", ".csv")
    return files


def test_every_refused_file_is_one_line_and_leaves_the_database_unchanged(world, project, tmp_path):
    ok = write_json(tmp_path / "ok.json", label_studio_export(project, 1, lambda r, t: ["road"] if r["id"] else None))
    project.import_file(ok)  # stored answers make the conflict checks meaningful
    before = dump(project.root)
    files = _bad_files(world, project, tmp_path)
    assert len(files) >= 18
    for name, (path, message) in files.items():
        with pytest.raises(SparsesegError) as info:
            project.import_file(path)
        text = str(info.value)
        assert "\n" not in text and str(path) in text, (name, text)
        assert re.search(message, text), (name, text)
        assert dump(project.root) == before, name
    # the command line: the same one line and exit code 2
    result = runner.invoke(app, ["import", str(project.root), str(files["unknown_class"][0])])
    assert result.exit_code == 2 and "lamppost" in result.output and "Traceback" not in result.output
    assert dump(project.root) == before


# ---------------------------------------------------------------------------- crashes and concurrency
def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sparseseg.cli", *args]


def _env(pause: float | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(PAUSE_ENV, None)
    if pause is not None:
        env[PAUSE_ENV] = str(pause)
    return env


def _kill_at(args: list[str], marker: str, timeout: float = 120) -> None:
    """Run a command with the row-pause hook and SIGKILL it once `marker` appears on its stderr."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=_env(30), text=True)
    deadline = time.monotonic() + timeout
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(lines)
        else:
            pytest.fail(f"never reached {marker!r}: {''.join(lines)}")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_import_or_query_leaves_the_database_consistent(world, project, tmp_path):
    root = project.root
    project.close()
    export = write_json(tmp_path / "ls.json", label_studio_export(project, 1, truthful(world)))
    before = dump(root)
    _kill_at(_command("import", str(root), str(export)), "sparseseg-test answer row 0")  # 1 of 4 answers written
    conn = sqlite3.connect(root / DB_FILE)  # the hot journal is rolled back on first access
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    assert dump(root) == before
    proj = Project(root)
    assert proj.import_file(export).new == 4 and len(stored(proj)) == 4
    # the same for a query killed between its rows: no round 2, no queries, and it runs again
    before = dump(root)
    _kill_at(_command("query", str(root)), "sparseseg-test query row 0")
    assert dump(root) == before
    assert proj.query().round == 2
    proj.close()


def test_concurrent_imports_neither_corrupt_nor_duplicate(world, project, tmp_path):
    root = project.root
    project.close()
    qs = queries(project)
    a = tmp_path / "a.csv"
    a.write_text("query_id,class\n" + "".join(f"{q['query_id']},road\n" for q in qs[:3]))
    b = tmp_path / "b.csv"
    b.write_text("query_id,class\n" + "".join(f"{q['query_id']},road\n" for q in qs[1:]))
    procs = [subprocess.Popen(_command("import", str(root), str(f)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(0.2), text=True) for f in (a, b, a)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    conn = sqlite3.connect(root / DB_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT query_id) FROM answers").fetchone() == (4, 4)
    imports = conn.execute("SELECT file, new, unchanged FROM imports ORDER BY id").fetchall()
    conn.close()
    assert len(imports) == 2 and sum(new for _, new, _ in imports) == 4
    assert sum("already imported" in out for out, _ in outputs) == 1


def _holding(args: list[str], pause: float, marker: str, timeout: float = 120) -> subprocess.Popen:
    """Start a command with the row-pause hook and return once `marker` is on its stderr: it then holds the
    write lock for about `pause` seconds per remaining row."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(pause), text=True)
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if marker in line:
            return proc
        assert time.monotonic() < deadline, line
    proc.kill()
    pytest.fail(f"never reached {marker!r}: {proc.communicate()}")


WAITING = "another sparseseg command is writing to this project; waiting for it"


def test_imports_that_find_the_lock_held_wait_with_a_message_and_add_nothing_twice(world, project, tmp_path):
    root = project.root
    project.close()
    qs = queries(project)
    a = tmp_path / "a.csv"
    a.write_text("query_id,class\n" + "".join(f"{q['query_id']},road\n" for q in qs[:3]))
    b = tmp_path / "b.csv"
    b.write_text("query_id,class\n" + "".join(f"{q['query_id']},road\n" for q in qs[1:]))
    # The test holds the write lock itself, so both imports find it held however slowly they start.
    holder = sqlite3.connect(root / DB_FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    procs = [subprocess.Popen(_command("import", str(root), str(f)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(None), text=True) for f in (a, b)]
    def until_waiting(proc: subprocess.Popen) -> str:  # blocks until that import reports its wait (or ends)
        seen = ""
        for line in proc.stderr:
            seen += line
            if WAITING in line:
                break
        return seen

    before = [until_waiting(p) for p in procs]
    holder.execute("ROLLBACK")
    holder.close()
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(WAITING in text for text in before), before
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("Traceback" not in err for _, err in outputs)
    # whichever went first stored 3 answers, the other the one left (its others were unchanged)
    assert sorted(int(re.search(r"(\d+) new answers", out).group(1)) for out, _ in outputs) == [1, 3], outputs
    conn = sqlite3.connect(root / DB_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT query_id) FROM answers").fetchone() == (4, 4)
    conn.close()


def test_a_query_during_an_import_waits_then_refuses_a_stale_selection(world, project, tmp_path):
    root = project.root
    project.close()
    export = write_json(tmp_path / "ls.json", label_studio_export(project, 1, truthful(world)))
    importing = _holding(_command("import", str(root), str(export)), 1.5, "sparseseg-test answer row 0")
    query = subprocess.run(_command("query", str(root), "--force"), capture_output=True, text=True,
                           env=_env(None), timeout=300)
    out, err = importing.communicate(timeout=180)
    assert importing.returncode == 0 and "4 new answers" in out, (out, err)
    # The query selected on the state before the import; it may not record that selection.
    if query.returncode == 0:  # it only got to its snapshot after the import had committed
        assert "round 2" in query.stdout
    else:
        assert query.returncode == 2 and "Traceback" not in query.stderr, query.stderr
        assert "changed while the pixels were being selected" in query.stderr, query.stderr
        rerun = subprocess.run(_command("query", str(root)), capture_output=True, text=True, env=_env(None),
                               timeout=300)
        assert rerun.returncode == 0 and "round 2" in rerun.stdout, rerun.stderr
    proj = Project(root)
    assert len(stored(proj)) == 4
    conn = sqlite3.connect(root / DB_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT image_id || ',' || y || ',' || x) FROM queries").fetchone() \
        == (4 + proj.config.budget, 4 + proj.config.budget)
    assert [r[0] for r in conn.execute("SELECT round FROM rounds ORDER BY round")] == [1, 2]
    conn.close()
    proj.close()


# ---------------------------------------------------------------------------- predict, status, CLI
def test_predict_writes_palette_masks_and_confidence(world, project, tmp_path):
    with pytest.raises(SparsesegError, match="no answer to train on yet"):
        project.predict(tmp_path / "none")
    project.import_file(write_json(tmp_path / "ls.json", label_studio_export(project, 1, truthful(world))))
    files = project.predict(tmp_path / "masks", confidence=True)
    names = [r.name for r in project.image_rows]
    assert sorted(f.name for f in files) == sorted(
        f"{n}{s}" for n in names for s in (".png", "_confidence.png", "_confidence.npy"))
    mask = Image.open(tmp_path / "masks" / f"{names[0]}.png")
    assert mask.mode == "P" and mask.size == (SIZE, SIZE)
    assert mask.getpalette()[:3] == project.meta.palette[0]
    assert np.asarray(mask).max() < len(SYNTHETIC_CLASSES)
    conf = np.load(tmp_path / "masks" / f"{names[0]}_confidence.npy")
    assert conf.shape == (SIZE, SIZE) and 0 < conf.min() <= conf.max() <= 1


def test_cli_walkthrough(world, tmp_path):
    p = str(tmp_path / "proj")
    result = runner.invoke(app, ["init", p, "--images", str(world["images"]), "--classes", str(world["classes"]),
                                 "--backbone", str(world["ckpt"]), "--size", str(SIZE),
                                 *[a for s in SETTINGS for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["query", p, "--budget", "3"])
    assert result.exit_code == 0, result.output
    assert "round 1: 3 pixels" in result.output and "tasks.json" in result.output and "cvat.xml" in result.output
    assert runner.invoke(app, ["query", p]).exit_code == 2
    qs = queries(Project(p))
    answers = tmp_path / "a.csv"
    answers.write_text("query_id,class\n" + "".join(f"{q['query_id']},sky\n" for q in qs))
    result = runner.invoke(app, ["import", p, str(answers)])
    assert result.exit_code == 0 and "3 new answers" in result.output, result.output
    result = runner.invoke(app, ["status", p, "--json"])
    info = json.loads(result.output)
    assert info["totals"]["answered"] == 3 and info["class_histogram"]["sky"] == 3
    assert runner.invoke(app, ["status", p]).exit_code == 0
    shutil.rmtree(round_dir(Path(p), 1))
    result = runner.invoke(app, ["export", p])
    assert result.exit_code == 0 and (round_dir(Path(p), 1) / "tasks.json").exists()
    result = runner.invoke(app, ["predict", p, "--out", str(tmp_path / "m"), "--original-size"])
    assert result.exit_code == 0, result.output
    original = Image.open(next(world["images"].iterdir())).size
    assert Image.open(next((tmp_path / "m").iterdir())).size == original
