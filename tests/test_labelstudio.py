"""A real Label Studio server: our tasks in, answers submitted through its HTTP API, its export back in.

Label Studio runs from its own virtual environment (.venv-ls, `make labelstudio`, pinned in
requirements-labelstudio.lock), because its pinned dependencies conflict with ours. The server
listens on a loopback port with a throw-away data folder; the test skips when .venv-ls is absent.
Run with `make test-integration` (the `labelstudio` marker is deselected from `make test`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparseseg.annotate.coords import from_percent
from sparseseg.annotate.export import MODEL_VERSION
from sparseseg.annotate.init import init_project
from sparseseg.annotate.layout import round_dir
from sparseseg.annotate.project import Project
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from tests.conftest import save_tiny_adm

pytestmark = pytest.mark.labelstudio

LABEL_STUDIO = Path(__file__).resolve().parents[1] / ".venv-ls" / "bin" / "label-studio"
SIZE = 32
BUDGET = 6
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A Label Studio process on 127.0.0.1 with one admin user and a legacy API token."""

    def __init__(self, root: Path, document_root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(20)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update({
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",  # images served from the project folder
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",  # no open sign-up on this server
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",  # no call to the package index at start
        })
        self.log = root / "label-studio.log"
        self.started = time.monotonic()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(LABEL_STUDIO), "start", "--no-browser", "--data-dir", str(root / "data"), "--internal-host",
                 "127.0.0.1", "--port", str(self.port), "--username", "annotator@example.com", "--password",
                 secrets.token_hex(8), "--user-token", self.token, "--enable-legacy-api-token"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
        self.start_seconds: float | None = None

    def wait(self) -> float:
        """Block until /health answers; returns the seconds since the process started."""
        while self.start_seconds is None:
            if self.proc.poll() is not None:
                pytest.fail(f"label-studio exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() - self.started > START_TIMEOUT_S:
                pytest.fail(f"label-studio not up after {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        self.start_seconds = time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        return self.start_seconds

    def call(self, method: str, path: str, body=None, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{method} {path}: HTTP {exc.code}: {exc.read()[:2000]!r}")
        return payload if raw else json.loads(payload)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and any child it started
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not LABEL_STUDIO.exists():
        pytest.skip(f"{LABEL_STUDIO} not found: `make labelstudio` installs the pinned Label Studio into .venv-ls")
    root = tmp_path_factory.mktemp("labelstudio")
    srv = Server(root, document_root=root / "project")  # the sparseseg project is made there meanwhile
    yield srv
    srv.stop()


def _make_project(root: Path) -> tuple[Project, dict[str, np.ndarray]]:
    make_synthetic(root / "synthetic", n_train=4, n_test=1, size=SIZE, seed=5)
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    save_tiny_adm(root / "adm.pt", SIZE)
    proj = init_project(root / "project", root / "synthetic" / "train" / "images", root / "classes.txt", size=SIZE,
                        backbone={"checkpoint": str(root / "adm.pt")},
                        overrides=[f"budget={BUDGET}", "strategy.candidates_per_image=64", "strategy.k_per_image=5",
                                   "backbone.device=cpu"])
    masks = {p.stem: np.asarray(Image.open(p)) for p in (root / "synthetic" / "train" / "masks").iterdir()}
    return proj, masks


def test_label_studio_round_trip(server, capsys):
    root = server.log.parent
    # 1. while the server starts: a project and its first round of queries
    proj, masks = _make_project(root)
    proj.query()
    out = round_dir(proj.root, 1)
    tasks = json.loads((out / "tasks.json").read_text())
    start = server.wait()
    with capsys.disabled():  # the start-up time is worth seeing in CI logs
        print(f"\nlabel-studio answered /health {start:.1f} s after it was started")

    # 2. a Label Studio project with our labelling config, local-file image serving, our tasks
    ls_project = server.call("POST", "/api/projects", {"title": "sparseseg round 1",
                                                       "label_config": (out / "label_config.xml").read_text()})
    pid = ls_project["id"]
    images = proj.root / "data" / "train" / "images"
    server.call("POST", "/api/storages/localfiles/", {"project": pid, "path": str(images), "title": "images",
                                                      "use_blob_urls": False})
    imported = server.call("POST", f"/api/projects/{pid}/import", tasks)
    assert imported["task_count"] == len(tasks) and imported["prediction_count"] == len(tasks)
    # annotators see the pre-placed points when the project pre-labels with our model version
    settings = server.call("PATCH", f"/api/projects/{pid}", {"show_collab_predictions": True,
                                                            "model_version": MODEL_VERSION})
    assert settings["show_collab_predictions"] is True and settings["model_version"] == MODEL_VERSION
    listed = server.call("GET", f"/api/tasks?project={pid}&page_size=100")["tasks"]
    assert len(listed) == len(tasks)
    first = listed[0]["data"]
    served = server.call("GET", first["image"], raw=True)  # what the annotator's browser loads
    assert served == (images / f"{first['image_name']}.png").read_bytes()

    # 3. the annotator: open each task's pre-placed points, give each the class under it, submit
    submitted: dict[int, str] = {}
    for task in listed:
        predictions = server.call("GET", f"/api/predictions/?task={task['id']}")
        assert len(predictions) == 1
        result = []
        for region in predictions[0]["result"]:
            y, x = from_percent(region["value"]["y"], SIZE), from_percent(region["value"]["x"], SIZE)
            label = SYNTHETIC_CLASSES[int(masks[task["data"]["image_name"]][y, x])]
            if not submitted:
                label = "unsure"  # one "cannot tell" answer
            submitted[int(region["id"][1:])] = label
            result.append({**region, "value": {**region["value"], "keypointlabels": [label]}})
        server.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": result, "lead_time": 3.5})
    assert len(submitted) == BUDGET

    # 4. Label Studio's JSON export, imported into sparseseg
    export = root / "label-studio-export.json"
    export.write_bytes(server.call("GET", f"/api/projects/{pid}/export?exportType=JSON", raw=True))
    result = proj.import_file(export)
    assert (result.format, result.new, result.skips, result.unanswered) == ("label-studio", BUDGET, 1, 0)

    # 5. every stored answer is at exactly the queried pixel, with the submitted class
    queried = {int(r.split(",")[0]): r.split(",")[1:] for r in (out / "queries.csv").read_text().splitlines()[1:]}
    rows = proj.store.conn.execute("SELECT query_id, image, y, x, class, skip, source FROM labelled_pixels").fetchall()
    assert len(rows) == BUDGET
    for query_id, image, y, x, cls, skip, source in rows:
        assert [image, str(x), str(y)] == queried[query_id]
        assert (None if skip else cls) == (None if submitted[query_id] == "unsure" else submitted[query_id])
        assert source == "label-studio"
    assert proj.import_file(export).already is not None
    assert proj.status()["totals"] == {"queried": BUDGET, "answered": BUDGET - 1, "skipped": 1, "pending": 0}
    proj.close()
