"""Reliability: SIGKILL at seeded random moments of `run`, `pretrain`, `query` and `import`, then resume.

Each command runs in a child of one forkserver that imported torch and sparseseg once, so a kill
point costs the command's own time rather than a fresh interpreter's start-up. For each point the
child is killed after a seeded random delay (uniform over the uninterrupted run's duration), the
same command is run again to completion, and the result must equal the uninterrupted run's:

    run       every file of the run directory byte for byte (rounds.jsonl without its timings)
    pretrain  the checkpoint, its loss curve and sample grid, byte for byte
    query     the rounds and queries in the database, and the round's exported files byte for byte
    import    every current answer, no answer lost or stored twice

and SQLite's `PRAGMA integrity_check` is ok after every kill. CI runs DEFAULT_POINTS per command;
SPARSESEG_KILL_POINTS=N runs N of each (docs/reliability.md gives the counts of longer runs).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from sparseseg.seeding import derived_seed

# Kill points per command in CI (pretrain is the heaviest); SPARSESEG_KILL_POINTS=N sets every command to N.
DEFAULT_POINTS = {"run": 3, "pretrain": 2, "query": 3, "import": 4}
KILL_POINTS = {name: int(os.environ.get("SPARSESEG_KILL_POINTS", n)) for name, n in DEFAULT_POINTS.items()}
SIZE = 32
PRELOAD = ["torch", "sparseseg.cli", "sparseseg.loop.experiment", "sparseseg.annotate.project",
           "sparseseg.backbones.pretrain", "tests.test_reliability_kill"]


@pytest.fixture(scope="module")
def ctx():
    """A forkserver whose server imported torch and sparseseg (single-threaded, so forking is safe)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # the server inherits it before torch starts its thread pool
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _child(target: str, *args) -> None:
    """Runs in the forked child: one thread, then the command."""
    import torch

    torch.set_num_threads(1)
    globals()[target](*args)


def run_to_end(ctx, target: str, *args, timeout: float = 300) -> float:
    """Run `target(*args)` in a child to completion; returns its wall time."""
    start = time.monotonic()
    proc = ctx.Process(target=_child, args=(target, *args))
    proc.start()
    proc.join(timeout)
    assert proc.exitcode == 0, f"{target} exited with {proc.exitcode}"
    return time.monotonic() - start


def kill_after(ctx, delay: float, target: str, *args) -> bool:
    """Start `target(*args)` in a child and SIGKILL it after `delay` seconds; False if it finished first."""
    proc = ctx.Process(target=_child, args=(target, *args))
    proc.start()
    proc.join(delay)
    if proc.exitcode is not None:
        assert proc.exitcode == 0, f"{target} exited with {proc.exitcode} before its kill"
        return False
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended between the join's timeout and the kill (the forkserver reaped it)
        proc.join()
        assert proc.exitcode == 0, f"{target} exited with {proc.exitcode} before its kill"
        return False
    proc.join()
    return True


def delays(command: str, span: float) -> list[float]:
    """KILL_POINTS[command] seeded moments in (0, span)."""
    rng = random.Random(derived_seed("kill-points", command))
    return [rng.uniform(0.02, span) for _ in range(KILL_POINTS[command])]


# ---------------------------------------------------------------------------- the commands (run in children)
def do_run(data: str, ckpt: str, out: str) -> None:
    from sparseseg.config import load_config
    from sparseseg.loop.experiment import Experiment

    Experiment(load_config(None, [f"data={data}", f"out={out}", f"backbone.checkpoint={ckpt}", "rounds=2", "budget=3",
                                  "backbone.timesteps=[50]", "backbone.blocks=[5,8]",
                                  "strategy.candidates_per_image=32", "strategy.k_per_image=4",
                                  "features.noise_samples=2", "head.epochs=5", "preview_images=1"])).run()


def do_pretrain(images: str, out: str) -> None:
    from sparseseg.backbones.pretrain import pretrain_adm

    pretrain_adm(images, out, size=SIZE, channels=32, steps=6, batch_size=1, checkpoint_every=2, samples=1,
                 sample_steps=1, device="cpu")


def do_query(root: str, rerun: bool = False) -> None:
    """`sparseseg query`; as a rerun after a kill, a refusal because the round is already there counts as done
    (the killed query had finished), and the comparison of the whole state decides."""
    from sparseseg.annotate.project import Project
    from sparseseg.errors import SparsesegError

    proj = Project(Path(root))
    try:
        proj.query()
    except SparsesegError as err:
        if not (rerun and "have no answer yet" in str(err)):
            raise
    proj.close()


def do_import(root: str, export: str) -> None:
    from sparseseg.annotate.project import Project

    proj = Project(Path(root))
    proj.import_file(Path(export))
    proj.close()


# ---------------------------------------------------------------------------- comparisons
def run_files(out: Path) -> dict[str, bytes]:
    """A run directory's files; rounds.jsonl without the per-phase seconds and memory."""
    files = {str(p.relative_to(out)): p.read_bytes().replace(str(out).encode(), b"OUT")
             for p in sorted(out.rglob("*")) if p.is_file()}
    records = [json.loads(line) for line in files.pop("rounds.jsonl").decode().splitlines()]
    files["rounds.jsonl"] = json.dumps([{k: v for k, v in r.items() if k != "phases"} for r in records]).encode()
    return files


def integrity_ok(db: Path) -> None:
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def project_state(root: Path) -> dict:
    """Rounds, queries and current answers (no timestamps or paths), plus the exported round files."""
    integrity_ok(root / "annotations.sqlite")
    conn = sqlite3.connect(root / "annotations.sqlite")
    state = {
        "rounds": conn.execute("SELECT round, strategy, budget, forced, info FROM rounds ORDER BY round").fetchall(),
        "queries": conn.execute("SELECT id, round, image_id, y, x, rank FROM queries ORDER BY id").fetchall(),
        "answers": conn.execute("SELECT query_id, class_id, annotator FROM answers WHERE current = 1 "
                                "ORDER BY query_id").fetchall(),
        "answer_rows": conn.execute("SELECT COUNT(*), COUNT(DISTINCT query_id) FROM answers").fetchone(),
        "imports": conn.execute("SELECT sha256, new FROM imports ORDER BY id").fetchall(),
    }
    conn.close()
    state["files"] = {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "rounds").rglob("*"))
                      if p.is_file()}
    return state


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
    from tests.conftest import save_tiny_adm

    root = tmp_path_factory.mktemp("kill")
    make_synthetic(root / "data", n_train=5, n_test=1, size=SIZE, seed=0)
    (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    return {"root": root, "data": root / "data", "ckpt": save_tiny_adm(root / "adm.pt", SIZE),
            "classes": root / "classes.txt"}


@pytest.fixture(scope="module")
def answered(world, ctx):
    """A project after round 1 was queried and answered from the masks (its next query trains a head)."""
    import numpy as np
    from PIL import Image

    from sparseseg.annotate.init import init_project
    from sparseseg.annotate.layout import round_dir
    from sparseseg.data.synthetic import SYNTHETIC_CLASSES

    root = world["root"] / "project"
    proj = init_project(root, world["data"] / "train" / "images", world["classes"], size=SIZE,
                        overrides=["budget=4", "strategy.candidates_per_image=32", "strategy.k_per_image=4",
                                   "features.noise_samples=2", "head.epochs=5", "backbone.device=cpu",
                                   "backbone.timesteps=[50]", "backbone.blocks=[5,8]"],
                        backbone={"checkpoint": str(world["ckpt"])})
    proj.close()
    run_to_end(ctx, "do_query", str(root))
    masks = {p.stem: np.asarray(Image.open(p)) for p in (world["data"] / "train" / "masks").iterdir()}
    rows = [r.split(",") for r in (round_dir(root, 1) / "queries.csv").read_text().splitlines()[1:]]
    answers = world["root"] / "answers.csv"
    answers.write_text("query_id,class\n" + "".join(
        f"{q},{SYNTHETIC_CLASSES[int(masks[i][int(y), int(x)])]}\n" for q, i, x, y in rows))
    return {"root": root, "answers": answers}


# ---------------------------------------------------------------------------- the tests
def test_killed_run_resumes_to_the_uninterrupted_result(world, ctx, tmp_path):
    reference = tmp_path / "reference"
    span = run_to_end(ctx, "do_run", str(world["data"]), str(world["ckpt"]), str(reference))
    print(f"run: {span:.1f} s uninterrupted")
    expected = run_files(reference)
    killed = 0
    for i, delay in enumerate(delays("run", span)):
        out = tmp_path / f"killed{i}"
        killed += kill_after(ctx, delay, "do_run", str(world["data"]), str(world["ckpt"]), str(out))
        run_to_end(ctx, "do_run", str(world["data"]), str(world["ckpt"]), str(out))
        got = run_files(out)
        assert sorted(got) == sorted(expected), (delay, sorted(set(got) ^ set(expected)))
        for name in expected:
            assert got[name] == expected[name], (delay, name)
    assert killed >= KILL_POINTS["run"] // 2  # most points land inside the run


def test_killed_pretrain_resumes_to_the_uninterrupted_checkpoint(world, ctx, tmp_path):
    images = world["data"] / "train" / "images"
    # torch.save names the archive after the file, so every run writes adm.pt in its own folder
    (tmp_path / "reference").mkdir()
    span = run_to_end(ctx, "do_pretrain", str(images), str(tmp_path / "reference" / "adm.pt"))
    print(f"pretrain: {span:.1f} s uninterrupted")
    names = ("adm.pt", "adm.pt.losses.csv", "adm.pt.samples.png")
    expected = [(tmp_path / "reference" / n).read_bytes() for n in names]
    for i, delay in enumerate(delays("pretrain", span)):
        (tmp_path / f"killed{i}").mkdir()
        out = tmp_path / f"killed{i}" / "adm.pt"
        kill_after(ctx, delay, "do_pretrain", str(images), str(out))
        run_to_end(ctx, "do_pretrain", str(images), str(out))
        got = [(tmp_path / f"killed{i}" / n).read_bytes() for n in names]
        for n, a, b in zip(names, got, expected, strict=True):
            assert a == b, (delay, n)


def test_killed_query_resumes_to_the_uninterrupted_round(answered, ctx, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(answered["root"], base)
    run_to_end(ctx, "do_import", str(base), str(answered["answers"]))
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    span = run_to_end(ctx, "do_query", str(reference))
    print(f"query: {span:.1f} s uninterrupted")
    expected = project_state(reference)
    assert [r[0] for r in expected["rounds"]] == [1, 2]
    for i, delay in enumerate(delays("query", span)):
        work = tmp_path / f"killed{i}"
        shutil.copytree(base, work)
        kill_after(ctx, delay, "do_query", str(work))
        integrity_ok(work / "annotations.sqlite")
        run_to_end(ctx, "do_query", str(work), True)
        assert project_state(work) == expected, delay


def test_query_killed_between_its_commit_and_its_files_finishes_them_on_rerun(answered, ctx, tmp_path):
    """The narrow window a timed kill rarely hits: round 2 recorded, some of its files not yet written."""
    reference = tmp_path / "reference"
    shutil.copytree(answered["root"], reference)
    run_to_end(ctx, "do_import", str(reference), str(answered["answers"]))
    run_to_end(ctx, "do_query", str(reference))
    expected = project_state(reference)
    for cut in (["review"], ["cvat.xml", "queries.csv"], ["tasks.json", "label_config.xml", "cvat.xml", "queries.csv",
                                                          "review"]):
        work = tmp_path / f"cut-{len(cut)}"
        shutil.copytree(reference, work)
        for name in cut:
            target = work / "rounds" / "002" / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if cut == ["review"]:
            (work / "rounds" / "002" / "review").mkdir()
            (work / "rounds" / "002" / "review" / "x.png.tmp").write_bytes(b"torn")  # a kill inside a write
            shutil.copy(reference / "rounds" / "002" / "review" / sorted(
                p.name for p in (reference / "rounds" / "002" / "review").iterdir())[0], work / "rounds" / "002" /
                "review")
        run_to_end(ctx, "do_query", str(work))
        got = project_state(work)
        got["files"].pop("rounds/002/review/x.png.tmp", None)
        assert got == expected, cut


def test_killed_import_resumes_without_losing_or_doubling_an_answer(answered, ctx, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(answered["root"], reference)
    span = run_to_end(ctx, "do_import", str(reference), str(answered["answers"]))
    print(f"import: {span:.1f} s uninterrupted")
    expected = project_state(reference)
    assert expected["answer_rows"] == (4, 4)
    for i, delay in enumerate(delays("import", span)):
        work = tmp_path / f"killed{i}"
        shutil.copytree(answered["root"], work)
        kill_after(ctx, delay, "do_import", str(work), str(answered["answers"]))
        integrity_ok(work / "annotations.sqlite")
        run_to_end(ctx, "do_import", str(work), str(answered["answers"]))
        assert project_state(work) == expected, delay
