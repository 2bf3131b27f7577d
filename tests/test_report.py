"""`sparseseg report`: the HTML of a run, a comparison and a labelling project, checked against the
files they come from (rounds.jsonl, labels.csv, compare's summary.md, the database), the test
previews against the run's own evaluation, and the page in a real headless Chromium (no console
error, every image decoded, the curves on screen). The browser part skips without Chromium
(`make browser` installs it)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix
from typer.testing import CliRunner

from sparseseg.annotate.init import init_project
from sparseseg.annotate.layout import round_dir
from sparseseg.cli import app
from sparseseg.compare import compare
from sparseseg.data.dataset import load_meta, load_split
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.report import build_report, report_kind
from sparseseg.report.charts import Chart, Series, _ticks, line_chart
from sparseseg.report.page import markdown_html
from sparseseg.report.previews import PANEL
from tests.conftest import save_tiny_adm

SIZE = 32
runner = CliRunner()
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class Parsed(HTMLParser):
    """Tables (rows of cell texts), images (alt -> src), every URL attribute, tags seen."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: dict[str, str] = {}
        self.urls: list[str] = []
        self.tags: Counter = Counter()
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        self.urls += [v for k, v in attrs if k in ("src", "href", "srcset", "data", "action") and v]
        if tag == "img":
            self.images[a.get("alt", "")] = a["src"]
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def class_ids(picture: np.ndarray, palette) -> np.ndarray:
    """A preview panel back to (S, S) class ids: the centre of each enlarged pixel, matched to the palette."""
    scale = PANEL // SIZE
    centres = picture[scale // 2::scale, scale // 2::scale]
    lut = {tuple(int(v) for v in c): i for i, c in enumerate(palette)}
    return np.vectorize(lambda r, g, b: lut[(r, g, b)])(centres[..., 0], centres[..., 1], centres[..., 2])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A comparison (2 strategies x 1 seed, 2 rounds), and a labelling project with answers and a head."""
    root = tmp_path_factory.mktemp("report")
    make_synthetic(root / "data", n_train=6, n_test=2, size=SIZE, seed=0)
    save_tiny_adm(root / "adm.pt", SIZE)
    (root / "tiny.yaml").write_text("data: data\nbackbone: {checkpoint: adm.pt}\nrounds: 2\nbudget: 3\n"
                                    "preview_images: 2\nhead: {epochs: 20}\n"
                                    "strategy: {candidates_per_image: 48, k_per_image: 5, noise_samples: 2}\n")
    compare(root / "tiny.yaml", ["random", "two_stage_edald"], [0], root / "cmp")
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    proj = init_project(root / "proj", root / "data" / "train" / "images", root / "classes.txt", size=SIZE,
                        backbone={"checkpoint": str(root / "adm.pt")},
                        overrides=["budget=4", "strategy.candidates_per_image=48", "strategy.k_per_image=5",
                                   "strategy.noise_samples=2", "head.epochs=20", "backbone.device=cpu"])
    proj.query()
    masks = {p.stem: np.asarray(Image.open(p)) for p in (root / "data" / "train" / "masks").iterdir()}
    rows = list(csv.DictReader((round_dir(proj.root, 1) / "queries.csv").open()))
    answers = root / "answers.csv"
    answers.write_text("query_id,class\n" + "".join(
        f"{r['query_id']},{'unsure' if n == 0 else SYNTHETIC_CLASSES[masks[r['image']][int(r['y']), int(r['x'])]]}\n"
        for n, r in enumerate(rows[:3])))  # the fourth stays pending
    proj.import_file(answers)
    proj.train()
    proj.close()
    return root


# ---------------------------------------------------------------------------- charts and page pieces
def test_ticks_cover_the_values_with_round_steps():
    for low, high in [(0, 9), (0, 24.98), (-3, 24), (0.5, 0.52), (0, 100), (5, 5)]:
        ticks = _ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and len(ticks) >= 2
        steps = np.diff(ticks)
        assert np.allclose(steps, steps[0])
        mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


def test_a_line_chart_puts_each_value_where_the_axes_say():
    svg = line_chart(Chart("t", "round", "%", [Series("a", [1, 2, 3], [0.0, 50.0, 100.0], "#1f77b4")], width=400,
                           height=300))
    root = ET.fromstring(svg)  # well-formed SVG
    ns = {"s": "http://www.w3.org/2000/svg"}
    frame = [r for r in root.findall("s:rect", ns) if r.get("fill") == "none"][0]
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    w, h = float(frame.get("width")), float(frame.get("height"))
    points = [tuple(map(float, p.split(","))) for p in root.find("s:polyline", ns).get("points").split()]
    # x: rounds 1..3 span the frame; y: 0..100 (the ticks) from the bottom to the top
    expected = [(x0, y0 + h), (x0 + w / 2, y0 + h / 2), (x0 + w, y0)]
    assert np.allclose(points, expected, atol=0.06), (points, expected)


def test_markdown_tables_become_html_tables_cell_for_cell():
    text = "# T\n\nSome `code` here.\n\n| a | b (%) |\n| --- | ---: |\n| x<y | 1.50 ± 0.20 |\n| z | -3.1 |\n"
    parsed = Parsed(markdown_html(text))
    assert parsed.tables == [[["a", "b (%)"], ["x<y", "1.50 ± 0.20"], ["z", "-3.1"]]]
    assert parsed.tags["code"] == 1 and parsed.tags["h3"] == 1 and "x&lt;y" in markdown_html(text)


def test_a_folder_that_is_none_of_the_three_is_one_clear_line(tmp_path):
    with pytest.raises(SparsesegError, match="not a run directory .* a comparison folder .* a labelling project"):
        report_kind(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a folder" in result.output


# ---------------------------------------------------------------------------- the three reports
def _self_contained(html: str) -> Parsed:
    parsed = Parsed(html)
    assert all(u.startswith("data:image/png;base64,") for u in parsed.urls), [u[:60] for u in parsed.urls]
    assert parsed.tags["script"] == 0 and parsed.tags["link"] == 0 and parsed.tags["iframe"] == 0
    for uri in parsed.images.values():
        decode(uri)  # every image is a valid PNG
    return parsed


def test_run_report_tables_come_from_the_run_files_and_test_previews_reproduce_its_evaluation(made):
    run = made / "cmp" / "two_stage_edald_s0"
    html = build_report(run, previews=2)
    parsed = _self_contained(html)
    records = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    rounds = next(t for t in parsed.tables if t[0][:3] == ["round", "new picks", "labelled"])
    for row, rec in zip(rounds[1:], records, strict=True):
        assert row[:5] == [str(rec["round"]), str(rec["new_pixels"]), str(rec["labelled"]), str(rec["void_answers"]),
                           f"{100 * rec['miou']:.2f}"]
        assert row[6] == f"{rec['phases']['select']['seconds']:.2f}"
    mix = next(t for t in parsed.tables if t[0][0] == "class" and t[0][-1] == "all")
    with (run / "labels.csv").open() as fh:
        counted = Counter(r["class"] for r in csv.DictReader(fh))
    assert {r[0]: int(r[-1]) for r in mix[1:]} == dict(counted)
    # the TEST previews are the run's head on the test split: their IoU is the run's own final mIoU
    meta, test = load_meta(made / "data"), load_split(made / "data", "test")
    assert len([k for k in parsed.images if k.startswith("test_") and k.endswith(": prediction")]) == 2
    predicted = [class_ids(decode(parsed.images[f"{n}: prediction"]), meta.palette) for n in test.names]
    truth = test.masks.numpy()
    keep = truth != 255
    cm = confusion_matrix(truth[keep], np.stack(predicted)[keep], labels=range(len(meta.classes)))
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    assert np.diag(cm)[union > 0].astype(float).__truediv__(union[union > 0]).mean() == pytest.approx(
        records[-1]["miou"], abs=1e-6)
    assert html.count("TEST image") == 2 and "never picked from" in html
    assert re.search(r'class="card test"', html)


def test_comparison_report_shows_compares_tables_as_it_wrote_them(made):
    html = build_report(made / "cmp")
    parsed = _self_contained(html)
    summary = Parsed(markdown_html((made / "cmp" / "summary.md").read_text()))
    assert summary.tables and all(t in parsed.tables for t in summary.tables)  # paired differences included
    assert any(t[0][:2] == ["strategy", "pairs"] for t in parsed.tables)
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') >= 1
    assert "random" in html and "two_stage_edald" in html


def test_project_report_counts_and_markers_come_from_the_database(made):
    html = build_report(made / "proj", previews=6)
    parsed = _self_contained(html)
    rounds = next(t for t in parsed.tables if t[0][0] == "round")
    assert rounds[1][3:] == ["4", "2", "1", "1"]  # queried, answered, unsure, pending
    assert "no test split" in html
    # each queried pixel carries its marker: the class colour (answered), black (unsure), the image (pending)
    from sparseseg.annotate.project import Project

    proj = Project(made / "proj")
    snap, names = proj.store.snapshot(), {r.id: r.name for r in proj.image_rows}
    palette = proj.meta.palette
    scale = PANEL // SIZE
    kinds = Counter()
    for q in snap.queries:
        name = names[q.image_id]
        assert f"{name}: head's prediction" in parsed.images
        points = decode(parsed.images[f"{name}: points"])
        centre = tuple(int(v) for v in points[int((q.y + 0.5) * scale), int((q.x + 0.5) * scale)])
        answer = snap.answers.get(q.id)
        original = np.asarray(Image.open(made / "proj" / "data" / "train" / "images" / f"{name}.png").convert("RGB"))
        if answer is None:
            kinds["pending"] += 1
            assert centre == tuple(int(v) for v in original[q.y, q.x])
        elif answer.class_id is None:
            kinds["unsure"] += 1
            assert centre == (0, 0, 0)
        else:
            kinds["answered"] += 1
            assert centre == tuple(palette[answer.class_id])
    proj.close()
    assert kinds == {"pending": 1, "unsure": 1, "answered": 2}
    result = runner.invoke(app, ["report", str(made / "proj"), "--out", str(made / "p.html"), "--no-predictions"])
    assert result.exit_code == 0, result.output
    assert "prediction" not in "".join(Parsed((made / "p.html").read_text()).images)


# ---------------------------------------------------------------------------- in a real browser
def _browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} not installed: `make browser` installs Debian's chromium and "
                    "chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def _load(driver, path: Path) -> list[dict]:
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def colour_pixels(png: np.ndarray, hex_colour: str, tolerance: int = 6) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(png.astype(int) - rgb).max(-1) <= tolerance).sum())


def test_the_reports_load_in_chromium_without_console_errors_and_show_the_curves(made, tmp_path):
    pages = {kind: tmp_path / f"{kind}.html" for kind in ("run", "comparison", "project")}
    for kind, folder in (("run", made / "cmp" / "random_s0"), ("comparison", made / "cmp"), ("project", made / "proj")):
        pages[kind].write_text(build_report(folder, previews=2))
    bad = tmp_path / "bad.html"  # the check must be able to fail: a missing image and a script error
    bad.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>console.error("x");</script></body></html>')
    driver = _browser()
    try:
        problems = _load(driver, bad)
        assert any("missing.png" in e["message"] for e in problems) and any('"x"' in e["message"] for e in problems)
        for kind, page in pages.items():
            assert _load(driver, page) == [], kind
            broken = driver.execute_script(
                "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
            assert broken == 0 and driver.execute_script("return document.images.length") > 0, kind
            shot = tmp_path / f"{kind}.png"
            driver.save_screenshot(str(shot))
            png = np.asarray(Image.open(shot).convert("RGB"))
            # the learning curves are at the top: the first series' colour (mIoU, or the first strategy,
            # or 'queried') and the second's are on screen
            first, second = ("#1f77b4", "#2ca02c") if kind == "project" else ("#1f77b4", "#ff7f0e")
            assert colour_pixels(png, first) > 50 and colour_pixels(png, second) > 50, kind
    finally:
        driver.quit()
