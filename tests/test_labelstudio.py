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
from typer.testing import CliRunner

from sparseseg.annotate.coords import from_percent
from sparseseg.annotate.export import MODEL_VERSION
from sparseseg.annotate.init import init_project
from sparseseg.annotate.labelstudio.client import TOKEN_ENV, LabelStudio, token_kind
from sparseseg.annotate.layout import round_dir
from sparseseg.annotate.project import Project
from sparseseg.cli import app
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from sparseseg.errors import SparsesegError
from tests.conftest import save_tiny_adm

pytestmark = pytest.mark.labelstudio

LABEL_STUDIO = Path(__file__).resolve().parents[1] / ".venv-ls" / "bin" / "label-studio"
SIZE = 32
BUDGET = 6
START_TIMEOUT_S = 300
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A Label Studio process on 127.0.0.1 with one admin user and a legacy API token."""

    def __init__(self, root: Path, document_root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(20)
        self.password = secrets.token_hex(8)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env.update({
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",  # images served from the projects' folder
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",  # no open sign-up on this server
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",  # no call to the package index at start
            # The key that signs personal access tokens. Left unset, Label Studio writes a random one to
            # its data folder's .env, and one that starts with '$' reads back empty at the next start
            # (django-environ takes it for a reference): a new key, and every token refused after a restart.
            "SECRET_KEY": secrets.token_hex(32),
        })
        self.log = root / "label-studio.log"
        self.starts = 0
        self.start()

    def start(self) -> None:
        """Start the process (again: the same data folder, port, user and token)."""
        self.starts += 1
        self.started = time.monotonic()
        self.start_seconds: float | None = None
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [str(LABEL_STUDIO), "start", "--no-browser", "--data-dir", str(self.root / "data"), "--internal-host",
                 "127.0.0.1", "--port", str(self.port), "--username", "annotator@example.com", "--password",
                 self.password, "--user-token", self.token, "--enable-legacy-api-token"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True)

    def restart(self) -> float:
        """Stop the server and start it again; returns the seconds until it answered."""
        self.stop()
        self.start()
        return self.wait()

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
    srv = Server(root, document_root=root)  # the sparseseg projects are made in it meanwhile
    yield srv
    srv.stop()


def _make_project(root: Path, name: str = "project", extra: tuple[str, ...] = ()) -> tuple[Project, dict[str, np.ndarray]]:
    """A project in root/name whose task images Label Studio serves from root (its document root)."""
    data = root / f"{name}-synthetic"
    make_synthetic(data, n_train=4, n_test=1, size=SIZE, seed=5)
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    save_tiny_adm(root / "adm.pt", SIZE)
    proj = init_project(root / name, data / "train" / "images", root / "classes.txt", size=SIZE,
                        backbone={"checkpoint": str(root / "adm.pt")},
                        overrides=[f"budget={BUDGET}", "strategy.candidates_per_image=64", "strategy.k_per_image=5",
                                   "backbone.device=cpu", f"image_url=/data/local-files/?d={name}/data/train/images/{{file}}",
                                   *extra])
    masks = {p.stem: np.asarray(Image.open(p)) for p in (data / "train" / "masks").iterdir()}
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


# ---------------------------------------------------------------------------- the live loop
def _server_tasks(server: Server, pid: int) -> list[dict]:
    return server.call("GET", f"/api/tasks?project={pid}&page_size=1000&fields=all")["tasks"]


def _answer(server: Server, task: dict, masks: dict[str, np.ndarray], unsure: bool) -> dict[int, str]:
    """The annotator: open the task (its pre-annotation), give each point the class under it, submit.

    The submitted result is the whole pre-annotation with the points labelled, the head's mask
    regions included, as the editor submits it.
    """
    predictions = server.call("GET", f"/api/predictions/?task={task['id']}")
    assert len(predictions) == 1
    submitted, result = {}, []
    for region in predictions[0]["result"]:
        if region["type"] == "keypointlabels":
            y, x = from_percent(region["value"]["y"], SIZE), from_percent(region["value"]["x"], SIZE)
            label = "unsure" if unsure and not submitted else SYNTHETIC_CLASSES[int(masks[task["data"]["image_name"]][y, x])]
            submitted[int(region["id"][1:])] = label
            region = {**region, "value": {**region["value"], "keypointlabels": [label]}}
        result.append(region)
    server.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": result, "lead_time": 2.0})
    return submitted


def _decode_brush(rles: list[list[int]]) -> list[np.ndarray]:
    """Label Studio's own decoder (label-studio-sdk in .venv-ls) on our brush RLEs: (S, S) alpha masks."""
    python = LABEL_STUDIO.parent / "python"
    code = ("import json, sys\nfrom label_studio_sdk.converter.brush import decode_rle\n"
            "print(json.dumps([decode_rle(r).tolist() for r in json.load(sys.stdin)]))")
    out = subprocess.run([str(python), "-c", code], input=json.dumps(rles), capture_output=True, text=True, check=True)
    return [np.asarray(v, dtype=np.uint8).reshape(SIZE, SIZE, 4)[..., 3] for v in json.loads(out.stdout)]


def _cli(*args: str, token: str) -> str:
    result = runner.invoke(app, list(args), env={TOKEN_ENV: token})
    assert result.exit_code == 0, result.output
    return result.output


def _check_counts(proj: Project, server: Server, pid: int, rounds: int) -> list[dict]:
    """Nothing duplicated or lost: one server task per (round, image), all recorded; answers complete."""
    tasks = _server_tasks(server, pid)
    keys = [(t["data"]["round"], t["data"]["image_name"]) for t in tasks]
    assert len(keys) == len(set(keys))
    snap = proj.store.snapshot()
    names = {r.id: r.name for r in proj.image_rows}
    expected = {(q.round, names[q.image_id]) for q in snap.queries}
    assert set(keys) == expected and len(snap.rounds) == rounds
    link = proj.store.ls_link()
    assert sorted(t.task for t in proj.store.ls_tasks(link.id)) == sorted(t["id"] for t in tasks)
    return tasks


def test_live_loop_connect_push_answer_pull_watch_twice_across_a_restart(server, tmp_path, capsys):
    root = server.log.parent
    proj, masks = _make_project(root, "live", ("strategy.noise_samples=2", "head.epochs=20"))
    proj.query()
    server.wait()
    # a personal access token (JWT refresh token), made through the API as the user would in Account & Settings
    pat = server.call("POST", "/api/token/", {})["token"]
    assert token_kind(pat) == "personal" and token_kind(server.token) == "legacy"
    live = str(proj.root)

    # 1. connect creates the project once; a second connect reuses it; the token is stored nowhere
    out = _cli("labelstudio", "connect", live, "--url", server.url, token=pat)
    assert "created Label Studio project" in out and "personal token" in out
    link = proj.store.ls_link()
    assert link.url == server.url and link.storage is not None
    assert "reusing" in _cli("labelstudio", "connect", live, "--url", server.url, token=server.token)
    assert proj.store.ls_link() == link
    ours = [p for p in server.call("GET", "/api/projects?page_size=100")["results"]
            if proj.project_id in (p.get("description") or "")]
    assert [p["id"] for p in ours] == [link.project]
    database = (proj.root / "annotations.sqlite").read_bytes()
    assert pat.encode() not in database and server.token.encode() not in database

    # 2. push round 1 (no head yet: points only); pushing again makes nothing; a task made by a push that
    #    died before recording it is found on the server and recorded, not made twice
    assert "0 found on the server" in _cli("labelstudio", "push", live, token=pat)
    first = _check_counts(proj, server, link.project, 1)
    assert "0 task(s) created" in _cli("labelstudio", "push", live, token=pat)
    with proj.store.write():
        proj.store.conn.execute("DELETE FROM ls_tasks WHERE task = ?", (first[0]["id"],))
    assert "0 task(s) created" in _cli("labelstudio", "push", live, token=pat)
    assert _check_counts(proj, server, link.project, 1) == first
    served = server.call("GET", first[0]["data"]["image"], raw=True)
    assert served == (proj.root / "data" / "train" / "images" / f"{first[0]['data']['image_name']}.png").read_bytes()

    # 3. the annotator answers round 1; pull --watch imports, trains, queries round 2 and pushes it with masks
    submitted = {}
    for n, task in enumerate(first):
        submitted.update(_answer(server, task, masks, unsure=n == 0))
    out = _cli("labelstudio", "pull", live, "--watch", "--max-rounds", "1", "--interval", "1", "--timeout", "600",
               token=pat)
    assert "round 2:" in out and "with the head's masks" in out and "stopped (max-rounds)" in out
    stored = {q: (c, s) for q, c, s in proj.store.conn.execute("SELECT query_id, class, skip FROM labelled_pixels")}
    assert {q: ("unsure" if s else c) for q, (c, s) in stored.items()} == submitted and len(submitted) == BUDGET
    second = [t for t in _check_counts(proj, server, link.project, 2) if t["data"]["round"] == 2]

    # 4. the head's masks on round 2's tasks, decoded by Label Studio's own decoder: one region per
    #    predicted class, together covering every pixel once, each exactly the head's prediction
    head, _ = proj.head()
    ids = {r.name: r.id for r in proj.image_rows}
    for task in second:
        prediction = server.call("GET", f"/api/predictions/?task={task['id']}")[0]
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        decoded = _decode_brush([r["value"]["rle"] for r in brushes])
        predicted = proj.predicted(head, ids[task["data"]["image_name"]])[0].numpy()
        assert sum((d > 0).astype(int) for d in decoded).tolist() == np.ones((SIZE, SIZE), int).tolist()
        for region, mask in zip(brushes, decoded, strict=True):
            cls = SYNTHETIC_CLASSES.index(region["value"]["brushlabels"][0])
            assert np.array_equal(mask > 0, predicted == cls)
        assert 0 < prediction["score"] <= 1 and prediction["model_version"] == MODEL_VERSION

    # 5. the server restarts; the tasks and the token survive; round 2 answered; the loop goes on to round 3
    restart = server.restart()
    with capsys.disabled():
        print(f"\nlabel-studio answered again {restart:.1f} s after a restart")
    assert _check_counts(proj, server, link.project, 2) == _check_counts(proj, server, link.project, 2)
    for task in second:
        submitted.update(_answer(server, task, masks, unsure=False))
    out = _cli("labelstudio", "pull", live, "--watch", "--max-rounds", "1", "--interval", "1", "--timeout", "600",
               token=pat)
    assert "round 3:" in out
    tasks = _check_counts(proj, server, link.project, 3)
    totals = proj.status()["totals"]
    assert totals == {"queried": 3 * BUDGET, "answered": 2 * BUDGET - 1, "skipped": 1, "pending": BUDGET}
    stored = {q: ("unsure" if s else c) for q, c, s in
              proj.store.conn.execute("SELECT query_id, class, skip FROM labelled_pixels")}
    assert stored == submitted
    assert len(tasks) == len({(t["data"]["round"], t["data"]["image_name"]) for t in tasks})

    # 6. nothing new: a plain pull imports nothing; a watch with nothing answered ends at its timeout
    imports = len(proj.store.imports())
    assert "nothing new" in _cli("labelstudio", "pull", live, token=pat)
    assert len(proj.store.imports()) == imports
    assert "stopped (timeout)" in _cli("labelstudio", "pull", live, "--watch", "--timeout", "2", "--interval", "1",
                                       token=pat)
    assert _check_counts(proj, server, link.project, 3) == tasks

    # 7. an organisation that turned legacy tokens off refuses them, and the message says what to do
    client = LabelStudio(server.url, pat)
    client.post("/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False})
    try:
        with pytest.raises(SparsesegError, match="legacy tokens may be off"):
            LabelStudio(server.url, server.token).whoami()
        assert client.whoami()["email"] == "annotator@example.com"
    finally:
        client.post("/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
    proj.close()
