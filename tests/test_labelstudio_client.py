"""The Label Studio client without Label Studio: token kinds and headers against a small local HTTP
server that checks them as Label Studio does, the error lines, and the brush RLE against a decoder
written here from the format's description (rle-pack's decode). The real server is in
tests/test_labelstudio.py."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sparseseg.annotate.labelstudio.brush import encode_rle, mask_rle
from sparseseg.annotate.labelstudio.client import (
    TOKEN_ENV,
    LabelStudio,
    jwt_payload,
    normalise_url,
    resolve_token,
    token_kind,
)
from sparseseg.annotate.labelstudio.sync import answers_export
from sparseseg.errors import SparsesegError

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def jwt(payload: dict) -> str:
    """An unsigned-looking JWT with this payload (the client never verifies signatures; the server does)."""
    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


class FakeServer:
    """Answers like Label Studio's auth layer: /api/token/refresh/ swaps a known refresh token for an
    access token (with `lifetime` seconds to live); other paths want `Token LEGACY` or a live
    `Bearer <access>`."""

    def __init__(self, refresh: str, lifetime: float = 300.0, legacy: bool = True) -> None:
        self.refresh, self.lifetime, self.legacy = refresh, lifetime, legacy
        self.issued: list[str] = []
        self.seen: list[tuple[str, str, str]] = []  # (method, path, authorization)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                outer.seen.append(("POST", self.path, self.headers.get("Authorization", "")))
                if self.path == "/api/token/refresh/":
                    if body.get("refresh") != outer.refresh:
                        return self._reply(401, {"detail": "Token is invalid", "code": "token_not_valid"})
                    access = jwt({"token_type": "access", "exp": time.time() + outer.lifetime,
                                  "jti": str(len(outer.issued))})
                    outer.issued.append(access)
                    return self._reply(200, {"access": access})
                self._guarded()

            def do_GET(self) -> None:
                outer.seen.append(("GET", self.path, self.headers.get("Authorization", "")))
                self._guarded()

            def _guarded(self) -> None:
                auth = self.headers.get("Authorization", "")
                ok = (auth == f"Token {LEGACY}" and outer.legacy) or (
                    auth.startswith("Bearer ") and auth[7:] in outer.issued
                    and jwt_payload(auth[7:])["exp"] > time.time())
                if not ok:
                    return self._reply(401, {"detail": "Authentication credentials were not provided."})
                if self.path.startswith("/api/missing"):
                    return self._reply(404, {"detail": "Not found."})
                self._reply(200, {"email": "a@example.com", "path": self.path})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(**kwargs) -> FakeServer:
        servers.append(FakeServer(jwt({"token_type": "refresh", "exp": time.time() + 1e9}), **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# ---------------------------------------------------------------------------- tokens
def test_token_kinds_are_read_from_the_token():
    assert token_kind(LEGACY) == "legacy"
    assert token_kind(jwt({"token_type": "refresh", "user_id": 1})) == "personal"
    assert token_kind(jwt({"token_type": "access", "exp": 1})) == "access"
    assert token_kind("a.b.c") == "legacy"  # three parts but no JSON payload: not a JWT
    assert jwt_payload(jwt({"exp": 5, "x": "é"})) == {"exp": 5, "x": "é"}


def test_the_token_comes_from_the_option_else_the_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SparsesegError, match=f"pass --token or set {TOKEN_ENV}"):
        resolve_token(None)
    monkeypatch.setenv(TOKEN_ENV, " from-env ")
    assert resolve_token(None) == "from-env" and resolve_token("given") == "given"
    assert normalise_url("localhost:8080/") == "http://localhost:8080"
    with pytest.raises(SparsesegError, match="--url is empty"):
        normalise_url(" ")


def test_a_legacy_token_is_sent_as_token(fake):
    server = fake()
    client = LabelStudio(server.url, LEGACY)
    assert client.get("/api/projects/")["path"] == "/api/projects/"
    assert server.seen == [("GET", "/api/projects/", f"Token {LEGACY}")]


def test_a_personal_access_token_is_exchanged_once_then_sent_as_bearer(fake):
    server = fake()
    client = LabelStudio(server.url, server.refresh)
    for _ in range(3):
        client.whoami()
    assert [s[1] for s in server.seen] == ["/api/token/refresh/"] + ["/api/current-user/whoami"] * 3
    assert len(server.issued) == 1
    assert all(auth == f"Bearer {server.issued[0]}" for _, path, auth in server.seen[1:])
    assert server.refresh not in json.dumps(server.seen[1:])  # the refresh token itself never goes as a header


def test_an_access_token_about_to_expire_is_renewed_first(fake):
    server = fake(lifetime=5.0)  # below the client's 30 s margin: every call renews
    client = LabelStudio(server.url, server.refresh)
    client.whoami()
    client.whoami()
    assert len(server.issued) == 2
    assert [s[1] for s in server.seen].count("/api/token/refresh/") == 2


def test_a_401_with_a_personal_token_renews_once_and_retries(fake):
    server = fake()
    client = LabelStudio(server.url, server.refresh)
    client.whoami()
    server.issued.clear()  # the server forgot the access token (e.g. its secret changed at a restart)
    assert client.whoami()["email"] == "a@example.com"
    assert [s[1] for s in server.seen] == ["/api/token/refresh/", "/api/current-user/whoami",
                                           "/api/current-user/whoami", "/api/token/refresh/",
                                           "/api/current-user/whoami"]


def test_refused_tokens_and_errors_are_one_line_that_says_what_to_do(fake):
    server = fake(legacy=False)
    with pytest.raises(SparsesegError, match="legacy tokens may be off in this organisation: use a personal access"):
        LabelStudio(server.url, LEGACY).whoami()
    stranger = jwt({"token_type": "refresh", "user_id": 9})
    with pytest.raises(SparsesegError, match=r"personal access token was refused \(HTTP 401: Token is invalid\)"):
        LabelStudio(server.url, stranger).whoami()
    with pytest.raises(SparsesegError, match=r"GET /api/missing: HTTP 404 \(Not found.\)"):
        LabelStudio(server.url, server.refresh).get("/api/missing")
    url = server.url
    server.close()
    with pytest.raises(SparsesegError, match=f"cannot reach Label Studio at {url}"):
        LabelStudio(url, LEGACY, timeout=2).whoami()


# ---------------------------------------------------------------------------- brush RLE
def decode_rle_pack(data: list[int]) -> np.ndarray:
    """rle-pack's decode, written from its description: 32-bit count, 5-bit word size - 1, four 4-bit
    run-field sizes - 1, then chunks (repeat bit, 2-bit field choice, run - 1, word(s)); MSB first."""
    bits = "".join(f"{b:08b}" for b in data)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = int(bits[pos:pos + n], 2) if n else 0
        pos += n
        return value

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out, i = [], 0
    while i < num:
        repeat = read(1)
        n = read(sizes[read(2)]) + 1
        out += [read(word)] * n if repeat else [read(word) for _ in range(n)]
        i += n
    return np.asarray(out, dtype=np.uint8)


def test_brush_rle_worked_by_hand():
    # [7, 7, 7, 0]: header (32 + 5 + 16 bits), then "1 00 010 00000111" (3 x 7) and "0 00 000 00000000" (one 0)
    header = f"{4:032b}" + f"{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    body = "1" + "00" + "010" + f"{7:08b}" + "0" + "00" + "000" + f"{0:08b}"
    stream = header + body
    stream += "0" * (-len(stream) % 8)
    expected = [int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)]
    assert encode_rle(np.array([7, 7, 7, 0], dtype=np.uint8)) == expected


@pytest.mark.parametrize("seed", range(4))
def test_brush_rle_decodes_to_the_mask(seed):
    rng = np.random.default_rng(seed)
    size = [1, 5, 32, 300][seed]  # 300 x 300 x 4 has runs longer than one 16-bit field (65,536)
    mask = np.zeros((size, size), bool)
    if seed < 3:
        mask = rng.random((size, size)) < 0.3
    else:
        mask[:, : size // 3] = True
    flat = decode_rle_pack(mask_rle(mask))
    assert flat.shape == (size * size * 4,)
    assert np.array_equal(flat.reshape(size, size, 4), np.repeat((mask * 255).astype(np.uint8)[..., None], 4, 2))
    values = rng.integers(0, 256, 1000).astype(np.uint8)
    assert np.array_equal(decode_rle_pack(encode_rle(values)), values)


def test_pulled_answers_keep_our_tasks_points_only_in_a_stable_order():
    point = {"type": "keypointlabels", "id": "q1", "value": {"x": 1, "y": 2, "keypointlabels": ["sky"]}}
    brush = {"type": "brushlabels", "id": "m1_0", "value": {"rle": [1, 2], "brushlabels": ["sky"]}}
    export = [
        {"id": 9, "data": {"a": 1}, "annotations": [{"id": 3, "result": [brush, point], "was_cancelled": False,
                                                     "completed_by": 1, "lead_time": 4.0}]},
        {"id": 4, "data": {"a": 2}, "annotations": [{"id": 1, "result": [point], "was_cancelled": True}]},
        {"id": 5, "data": {"a": 3}, "annotations": [{"id": 2, "result": [point], "was_cancelled": False}]},
        {"id": 77, "data": {}, "annotations": [{"id": 5, "result": [point]}]},  # not one of ours
    ]
    got = answers_export(export, {9, 4, 5})
    assert [t["id"] for t in got] == [5, 9]  # the cancelled-only task left out; sorted by id
    assert got[1]["annotations"][0]["result"] == [point] and "lead_time" not in got[1]["annotations"][0]
    assert answers_export(list(reversed(export)), {9, 4, 5}) == got


# ---------------------------------------------------------------------------- the store's link
def test_a_version_2_database_gains_the_label_studio_tables_in_place(tmp_path):
    import sqlite3

    from PIL import Image

    from sparseseg.annotate.init import init_project
    from sparseseg.annotate.project import Project
    from sparseseg.annotate.store import DB_FILE, SCHEMA_VERSION

    (tmp_path / "imgs").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    root = tmp_path / "p"
    init_project(root, tmp_path / "imgs", tmp_path / "classes.txt", size=8,
                 overrides=["backbone.name=efficientnet_lite0"]).close()  # no checkpoint to make; never loaded
    conn = sqlite3.connect(root / DB_FILE)  # what version 2 wrote
    for table in ("ls_tasks", "ls_links"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    before = list(conn.iterdump())
    conn.close()
    proj = Project(root)
    assert proj.store.ls_link() is None
    with proj.store.write():
        first = proj.store.set_ls_link("http://ls:8080", 4, 7)
    with proj.store.write():
        proj.store.set_ls_link("http://other:8080", 1, None)
    with proj.store.write():  # back to the first: the same row, current again, with its new storage
        again = proj.store.set_ls_link("http://ls:8080", 4, 8)
    assert (again.id, again.url, again.project, again.storage) == (first.id, "http://ls:8080", 4, 8)
    revision = proj.store.meta("revision")
    proj.close()
    conn = sqlite3.connect(root / DB_FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert conn.execute("SELECT COUNT(*), SUM(current) FROM ls_links").fetchone() == (2, 1)
    after = list(conn.iterdump())
    conn.close()
    assert set(before) <= set(after) and revision == "0"  # a link changes no query or answer


def test_commands_before_connect_or_without_a_token_are_one_line(tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from sparseseg.annotate.init import init_project
    from sparseseg.cli import app

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "classes.txt").write_text("sky\n")
    init_project(tmp_path / "p", tmp_path / "imgs", tmp_path / "classes.txt", size=8,
                 overrides=["backbone.name=efficientnet_lite0"]).close()
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    runner = CliRunner()
    for args, message in [
        (["push", str(tmp_path / "p"), "--token", "x"], "not connected to Label Studio; run `sparseseg labelstudio connect"),
        (["pull", str(tmp_path / "p"), "--url", "http://127.0.0.1:9"], f"pass --token or set {TOKEN_ENV}"),
        (["connect", str(tmp_path / "p"), "--url", "http://127.0.0.1:9", "--token", LEGACY],
         "cannot reach Label Studio at http://127.0.0.1:9"),
    ]:
        result = runner.invoke(app, ["labelstudio", *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
