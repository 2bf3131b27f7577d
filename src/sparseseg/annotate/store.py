"""The project's SQLite store: every query and every answer, in one file, changed only in transactions.

Guarantees (see docs/annotation.md):
  * every change (a query round, an import) is one transaction started with BEGIN IMMEDIATE, so a
    crash or kill at any moment leaves the database as it was before or after the change, never
    between (SQLite's rollback journal, synchronous=FULL);
  * two commands at once queue on the write lock (busy timeout BUSY_TIMEOUT_S) instead of failing,
    and UNIQUE constraints make a duplicate query or a second current answer impossible;
  * nothing is deleted: an answer replaced by a later import stays, marked `current = 0`.

Image ids are the images' positions in sorted name order (the order `load_split` reads them);
class ids are line numbers of the classes file; a skip ("unsure") answer has class_id NULL.

Schema history: version 1 had no `regions` table; version 2 adds it (SAM pixel-to-region expansion,
docs/expansion.md); version 3 adds `ls_links` and `ls_tasks` (the Label Studio project a project is
connected to, and every task pushed there; annotate/labelstudio/). An older database is upgraded in
place, all steps in one transaction, when opened; nothing already in it changes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sparseseg.errors import SparsesegError

DB_FILE = "annotations.sqlite"
SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 60.0
BUSY_FIRST_TRY_S = 0.5  # after this long on a held lock, a command says that it is waiting
# Test hook: seconds to sleep after each row written inside a transaction (announced on stderr),
# so a test can kill a command in the middle of one. Unset in normal use.
PAUSE_ENV = "SPARSESEG_TEST_PAUSE_ROWS"

SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE classes (
    id   INTEGER PRIMARY KEY CHECK (id >= 0 AND id < 255),
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE images (
    id     INTEGER PRIMARY KEY CHECK (id >= 0),
    name   TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    width  INTEGER NOT NULL,
    height INTEGER NOT NULL
);
CREATE TABLE rounds (
    round      INTEGER PRIMARY KEY CHECK (round >= 1),
    created_at TEXT NOT NULL,
    strategy   TEXT NOT NULL,
    budget     INTEGER NOT NULL,
    forced     INTEGER NOT NULL CHECK (forced IN (0, 1)),
    info       TEXT NOT NULL
);
CREATE TABLE queries (
    id       INTEGER PRIMARY KEY,
    round    INTEGER NOT NULL REFERENCES rounds (round),
    image_id INTEGER NOT NULL REFERENCES images (id),
    y        INTEGER NOT NULL CHECK (y >= 0),
    x        INTEGER NOT NULL CHECK (x >= 0),
    rank     INTEGER NOT NULL,
    UNIQUE (image_id, y, x)
);
CREATE TABLE imports (
    id          INTEGER PRIMARY KEY,
    sha256      TEXT NOT NULL UNIQUE,
    file        TEXT NOT NULL,
    format      TEXT NOT NULL,
    imported_at TEXT NOT NULL,
    new         INTEGER NOT NULL,
    unchanged   INTEGER NOT NULL,
    replaced    INTEGER NOT NULL,
    unanswered  INTEGER NOT NULL
);
CREATE TABLE answers (
    id          INTEGER PRIMARY KEY,
    query_id    INTEGER NOT NULL REFERENCES queries (id),
    class_id    INTEGER REFERENCES classes (id),
    source      TEXT NOT NULL,
    annotator   TEXT NOT NULL,
    answered_at TEXT NOT NULL,
    import_id   INTEGER NOT NULL REFERENCES imports (id),
    current     INTEGER NOT NULL DEFAULT 1 CHECK (current IN (0, 1)),
    replaced_by INTEGER REFERENCES answers (id)
);
CREATE UNIQUE INDEX answers_one_current ON answers (query_id) WHERE current = 1;
CREATE TABLE regions (
    id         INTEGER PRIMARY KEY,
    query_id   INTEGER NOT NULL REFERENCES queries (id),
    model      TEXT NOT NULL,
    tau        REAL NOT NULL,
    score      REAL NOT NULL CHECK (score >= 0 AND score <= 1),
    kept       INTEGER NOT NULL CHECK (kept IN (0, 1)),
    pixels     INTEGER NOT NULL CHECK (pixels >= 0),
    mask       BLOB,
    created_at TEXT NOT NULL,
    UNIQUE (query_id, model, tau)
);
CREATE TABLE ls_links (
    id         INTEGER PRIMARY KEY,
    url        TEXT NOT NULL,
    project    INTEGER NOT NULL,
    storage    INTEGER,
    created_at TEXT NOT NULL,
    current    INTEGER NOT NULL CHECK (current IN (0, 1)),
    UNIQUE (url, project)
);
CREATE UNIQUE INDEX ls_links_one_current ON ls_links (current) WHERE current = 1;
CREATE TABLE ls_tasks (
    link_id     INTEGER NOT NULL REFERENCES ls_links (id),
    task        INTEGER NOT NULL,
    round       INTEGER NOT NULL REFERENCES rounds (round),
    image_id    INTEGER NOT NULL REFERENCES images (id),
    pushed_at   TEXT NOT NULL,
    predicted   INTEGER NOT NULL CHECK (predicted IN (0, 1)),
    PRIMARY KEY (link_id, task),
    UNIQUE (link_id, round, image_id)
);
CREATE VIEW labelled_pixels AS
    SELECT q.id AS query_id, i.name AS image, q.y, q.x, a.class_id, c.name AS class,
           a.class_id IS NULL AS skip, q.round, a.source, a.annotator, a.answered_at, a.import_id
    FROM answers a
    JOIN queries q ON q.id = a.query_id
    JOIN images i ON i.id = q.image_id
    LEFT JOIN classes c ON c.id = a.class_id
    WHERE a.current = 1;
"""


def _statements(*prefixes: str) -> list[str]:
    """The statements of SCHEMA that start with one of `prefixes` (what an older version lacks)."""
    return [stmt for stmt in SCHEMA.split(";\n") if stmt.strip().startswith(prefixes)]


# Version v -> v + 1: the statements of SCHEMA that version v lacks.
MIGRATIONS = {
    1: _statements("CREATE TABLE regions"),
    2: _statements("CREATE TABLE ls_links", "CREATE UNIQUE INDEX ls_links_one_current", "CREATE TABLE ls_tasks"),
}


def now() -> str:
    """The current UTC time as ISO 8601 (seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pause_for_tests(what: str, row: int) -> None:
    """The crash-test hook: announce the row on stderr and sleep, when PAUSE_ENV is set."""
    delay = os.environ.get(PAUSE_ENV)
    if delay:
        print(f"sparseseg-test {what} row {row}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


@dataclass(frozen=True)
class ImageRow:
    id: int
    name: str
    source: str
    width: int
    height: int


@dataclass(frozen=True)
class QueryRow:
    id: int
    round: int
    image_id: int
    y: int
    x: int


@dataclass(frozen=True)
class AnswerRow:
    query_id: int
    class_id: int | None  # None: "unsure / skip"
    source: str
    annotator: str
    answered_at: str
    import_id: int


@dataclass(frozen=True)
class RoundRow:
    round: int
    created_at: str
    strategy: str
    budget: int
    forced: bool
    info: dict


@dataclass(frozen=True)
class NewAnswer:
    """An answer to store: a new one, or one replacing the current answer of its query."""

    query_id: int
    class_id: int | None
    annotator: str
    answered_at: str


@dataclass(frozen=True)
class RegionRow:
    """A click's SAM expansion under one (model, tau): its best mask's score and, when kept, the mask."""

    query_id: int
    model: str
    tau: float
    score: float  # predicted IoU of the best proposal, clamped to [0, 1]
    kept: bool
    pixels: int  # pixels of the kept mask (0 when not kept)
    mask: bytes | None  # the kept mask as a 1-bit PNG of the project size; None when not kept


@dataclass(frozen=True)
class LabelStudioLink:
    """The Label Studio project a project is connected to (never its token)."""

    id: int
    url: str  # the server's base URL
    project: int  # Label Studio's project id
    storage: int | None  # its local-files source storage serving our images; None when image_url is elsewhere
    created_at: str


@dataclass(frozen=True)
class PushedTask:
    """One Label Studio task made by `sparseseg labelstudio push`: a round's queries on one image."""

    task: int  # Label Studio's task id
    round: int
    image_id: int
    pushed_at: str
    predicted: bool  # whether the head's mask went with it as a pre-annotation


@dataclass
class Snapshot:
    """One consistent read of the project's rounds, queries and current answers."""

    revision: int
    rounds: list[RoundRow]
    queries: list[QueryRow]
    answers: dict[int, AnswerRow]  # current answer by query id

    @property
    def next_round(self) -> int:
        return self.rounds[-1].round + 1 if self.rounds else 1

    def pending(self) -> list[QueryRow]:
        return [q for q in self.queries if q.id not in self.answers]


def _connect(uri: str, path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn
    except sqlite3.Error as exc:
        raise SparsesegError(f"{path}: cannot open the project database ({exc})") from None


class AnnotationStore:
    """An open project database.

    Reads outside a `write()` block each see one committed state; call them inside `read()` to see
    several at once consistently. Writes happen only inside `write()`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SparsesegError(f"{self.path}: project database not found; is this a sparseseg project?")
        # mode=rw: never create an empty database by accident
        self.conn = _connect(self.path.absolute().as_uri() + "?mode=rw", self.path)
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            self.conn.execute("SELECT value FROM meta WHERE key = 'project_id'").fetchone()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise SparsesegError(f"{self.path}: not a sparseseg project database ({exc})") from None
        if version in MIGRATIONS:
            self._migrate()
        elif version != SCHEMA_VERSION:
            self.conn.close()
            raise SparsesegError(f"{self.path}: database schema version {version}, this sparseseg reads {SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Upgrade an older schema in place, all steps in one transaction (a concurrent opener waits,
        then finds the new version and does nothing)."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            while version in MIGRATIONS:
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
            if version != SCHEMA_VERSION:
                raise SparsesegError(f"{self.path}: database schema version {version}, this sparseseg reads "
                                     f"{SCHEMA_VERSION}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @classmethod
    def create(cls, path: Path, project_id: str, classes: Sequence[str], images: Sequence[ImageRow],
               size: int) -> AnnotationStore:
        """Write a new database (the file must not exist) and open it."""
        path = Path(path)
        if path.exists():
            raise SparsesegError(f"{path}: already exists; refusing to overwrite a project database")
        conn = _connect(path.absolute().as_uri() + "?mode=rwc", path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";\n"):  # executescript would commit the transaction first
                if statement.strip():
                    conn.execute(statement)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("project_id", project_id), ("created_at", now()), ("size", str(size)), ("revision", "0")])
            conn.executemany("INSERT INTO classes VALUES (?, ?)", list(enumerate(classes)))
            conn.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?)",
                             [(i.id, i.name, i.source, i.width, i.height) for i in images])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        return cls(path)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ transactions
    def _begin(self, begin: str) -> None:
        """BEGIN; when another command holds the lock, say so on stderr once, then wait up to BUSY_TIMEOUT_S."""
        self.conn.execute(f"PRAGMA busy_timeout = {int(1000 * BUSY_FIRST_TRY_S)}")
        try:
            self.conn.execute(begin)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            print(f"{self.path}: another sparseseg command is writing to this project; waiting for it "
                  f"(up to {BUSY_TIMEOUT_S:.0f} s)", file=sys.stderr, flush=True)
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(1000 * BUSY_TIMEOUT_S)}")
        self.conn.execute(begin)

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        try:
            self._begin(begin)
        except sqlite3.OperationalError as exc:
            raise SparsesegError(
                f"{self.path}: database busy for {BUSY_TIMEOUT_S:.0f} s ({exc}); another sparseseg command "
                "holds it: try again when it has finished"
            ) from None
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise SparsesegError(f"{self.path}: could not commit ({exc}); nothing was changed") from None

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read of several tables (a deferred transaction, or the open one)."""
        if self.conn.in_transaction:
            yield self.conn
            return
        with self._transaction("BEGIN") as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """The one way to change the database: all or nothing, one writer at a time."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    def _bump_revision(self) -> None:
        """Every change moves the revision on, so a query computed on an older state is refused."""
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")

    # ------------------------------------------------------------------ reads
    def meta(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise SparsesegError(f"{self.path}: damaged project database (no {key!r} in meta)")
        return row[0]

    @property
    def project_id(self) -> str:
        return self.meta("project_id")

    def classes(self) -> list[str]:
        return [name for (name,) in self.conn.execute("SELECT name FROM classes ORDER BY id")]

    def images(self) -> list[ImageRow]:
        return [ImageRow(*row) for row in self.conn.execute("SELECT id, name, source, width, height FROM images ORDER BY id")]

    def snapshot(self) -> Snapshot:
        """Rounds, queries and current answers as of one committed state."""
        with self.read() as conn:
            revision = int(self.meta("revision"))
            rounds = [RoundRow(r, c, s, b, bool(f), json.loads(i)) for r, c, s, b, f, i in conn.execute(
                "SELECT round, created_at, strategy, budget, forced, info FROM rounds ORDER BY round")]
            queries = [QueryRow(*row) for row in conn.execute(
                "SELECT id, round, image_id, y, x FROM queries ORDER BY id")]
            answers = {row[0]: AnswerRow(*row) for row in conn.execute(
                "SELECT query_id, class_id, source, annotator, answered_at, import_id FROM answers WHERE current = 1")}
        return Snapshot(revision, rounds, queries, answers)

    def imports(self) -> list[dict]:
        """Every recorded import, oldest first."""
        cur = self.conn.execute("SELECT id, file, format, imported_at, new, unchanged, replaced, unanswered "
                                "FROM imports ORDER BY id")
        keys = [d[0] for d in cur.description]
        return [dict(zip(keys, row, strict=True)) for row in cur]

    def regions(self, model: str, tau: float) -> dict[int, RegionRow]:
        """Every stored expansion under (model, tau), by query id."""
        cur = self.conn.execute("SELECT query_id, model, tau, score, kept, pixels, mask FROM regions "
                                "WHERE model = ? AND tau = ?", (model, tau))
        return {row[0]: RegionRow(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6]) for row in cur}

    def region_counts(self) -> list[dict]:
        """Per (model, tau): clicks expanded, regions kept, their pixels."""
        cur = self.conn.execute("SELECT model, tau, COUNT(*), SUM(kept), SUM(pixels) FROM regions "
                                "GROUP BY model, tau ORDER BY MIN(id)")
        return [{"model": m, "tau": t, "expanded": n, "kept": k or 0, "pixels": p or 0} for m, t, n, k, p in cur]

    def ls_link(self) -> LabelStudioLink | None:
        """The current Label Studio link, or None before `sparseseg labelstudio connect`."""
        row = self.conn.execute("SELECT id, url, project, storage, created_at FROM ls_links WHERE current = 1").fetchone()
        return None if row is None else LabelStudioLink(*row)

    def ls_tasks(self, link_id: int) -> list[PushedTask]:
        """Every task pushed to the linked project `link_id`, by round then image."""
        cur = self.conn.execute("SELECT task, round, image_id, pushed_at, predicted FROM ls_tasks WHERE link_id = ? "
                                "ORDER BY round, image_id", (link_id,))
        return [PushedTask(t, r, i, p, bool(d)) for t, r, i, p, d in cur]

    def find_import(self, sha256: str) -> tuple[int, str, str] | None:
        """(id, file, time) of an earlier import of a file with these bytes, if any."""
        return self.conn.execute("SELECT id, file, imported_at FROM imports WHERE sha256 = ?", (sha256,)).fetchone()

    # ------------------------------------------------------------------ writes (inside write())
    def add_round(self, expected_revision: int, round: int, strategy: str, budget: int, forced: bool, info: dict,
                  pixels: Sequence[tuple[int, int, int]]) -> list[int]:
        """Record round `round` and its queried pixels (image_id, y, x) in selection order; returns query ids.

        Raises:
            SparsesegError: the project changed since the selection was computed (another command ran),
                or a pixel is already queried.
        """
        assert self.conn.in_transaction, "add_round must run inside write()"
        if int(self.meta("revision")) != expected_revision:
            raise SparsesegError(
                f"{self.path}: the project changed while the pixels were being selected (another query or import "
                "ran); nothing was recorded: run the query again"
            )
        self._bump_revision()
        self.conn.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?)",
                          (round, now(), strategy, budget, int(forced), json.dumps(info)))
        ids = []
        for rank, (image_id, y, x) in enumerate(pixels):
            try:
                cur = self.conn.execute("INSERT INTO queries (round, image_id, y, x, rank) VALUES (?, ?, ?, ?, ?)",
                                        (round, image_id, y, x, rank))
            except sqlite3.IntegrityError:
                raise SparsesegError(
                    f"{self.path}: pixel (y={y}, x={x}) of image id {image_id} is already queried; nothing was recorded"
                ) from None
            ids.append(cur.lastrowid)
            pause_for_tests("query", rank)
        return ids

    def add_import(self, sha256: str, file: str, format: str, new: Sequence[NewAnswer], replace: Sequence[NewAnswer],
                   unchanged: int, unanswered: int) -> int:
        """Record one imported file and its new and replacing answers; returns the import id."""
        assert self.conn.in_transaction, "add_import must run inside write()"
        self._bump_revision()
        cur = self.conn.execute(
            "INSERT INTO imports (sha256, file, format, imported_at, new, unchanged, replaced, unanswered) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (sha256, file, format, now(), len(new), unchanged, len(replace), unanswered))
        import_id = cur.lastrowid
        row = 0
        for answer in replace:
            old = self.conn.execute("SELECT id FROM answers WHERE query_id = ? AND current = 1",
                                    (answer.query_id,)).fetchone()[0]
            self.conn.execute("UPDATE answers SET current = 0 WHERE id = ?", (old,))
            new_id = self._insert_answer(answer, format, import_id)
            self.conn.execute("UPDATE answers SET replaced_by = ? WHERE id = ?", (new_id, old))
            pause_for_tests("answer", row)
            row += 1
        for answer in new:
            self._insert_answer(answer, format, import_id)
            pause_for_tests("answer", row)
            row += 1
        return import_id

    def add_regions(self, rows: Sequence[RegionRow]) -> int:
        """Record SAM expansions; one already stored for the same (query, model, tau) is kept as it was.

        Regions are derived from answers (SAM sees only the image and the click), so they do not
        move the revision. Returns how many rows were new.
        """
        assert self.conn.in_transaction, "add_regions must run inside write()"
        added = 0
        for i, r in enumerate(rows):
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO regions (query_id, model, tau, score, kept, pixels, mask, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (r.query_id, r.model, r.tau, r.score, int(r.kept), r.pixels, r.mask, now()))
            added += cur.rowcount
            pause_for_tests("region", i)
        return added

    def set_ls_link(self, url: str, project: int, storage: int | None) -> LabelStudioLink:
        """Make (url, project) the current Label Studio link (an earlier link stays, not current, with its
        tasks); returns it. Links do not move the revision: they change no query or answer."""
        assert self.conn.in_transaction, "set_ls_link must run inside write()"
        self.conn.execute("UPDATE ls_links SET current = 0 WHERE current = 1")
        row = self.conn.execute("SELECT id FROM ls_links WHERE url = ? AND project = ?", (url, project)).fetchone()
        if row is None:
            self.conn.execute("INSERT INTO ls_links (url, project, storage, created_at, current) VALUES (?, ?, ?, ?, 1)",
                              (url, project, storage, now()))
        else:
            self.conn.execute("UPDATE ls_links SET current = 1, storage = ? WHERE id = ?", (storage, row[0]))
        return self.ls_link()

    def add_ls_task(self, link_id: int, task: int, round: int, image_id: int, predicted: bool) -> None:
        """Record a task pushed to Label Studio (a round's queries on one image are one task, once)."""
        assert self.conn.in_transaction, "add_ls_task must run inside write()"
        try:
            self.conn.execute("INSERT INTO ls_tasks (link_id, task, round, image_id, pushed_at, predicted) "
                              "VALUES (?, ?, ?, ?, ?, ?)", (link_id, task, round, image_id, now(), int(predicted)))
        except sqlite3.IntegrityError:
            raise SparsesegError(f"{self.path}: round {round} of image id {image_id} (or task {task}) is already "
                                 "recorded as pushed; nothing was recorded") from None

    def _insert_answer(self, answer: NewAnswer, source: str, import_id: int) -> int:
        cur = self.conn.execute(
            "INSERT INTO answers (query_id, class_id, source, annotator, answered_at, import_id) VALUES (?, ?, ?, ?, ?, ?)",
            (answer.query_id, answer.class_id, source, answer.annotator, answer.answered_at, import_id))
        return cur.lastrowid
