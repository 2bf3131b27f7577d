"""The `sparseseg` command line: one Typer app (`app.py`) and one module per command group, each a
thin layer that parses options, calls a library function and prints.

    prepare.py      prepare camvid | folder
    backbone.py     pretrain, fetch-backbone, features
    experiment.py   run, summarize, list, demo
    compare.py      compare, supervised
    scribbles.py    scribbles simulate | from-run
    scribblegen.py  scribblegen train | generate | controlnet-train | controlnet-generate | compare | evaluate
    annotate.py     init, query, import, export, train, predict, status
    labelstudio.py  labelstudio connect | push | pull [--watch]
    report.py       report: one self-contained HTML page for a run, a comparison or a project
    extract.py      extract, select, segment: the pipeline sharded over processes (torchrun)

Importing a command module registers its commands on `app`; the order below is the order of
`sparseseg --help`. The entry point is `sparseseg = "sparseseg.cli:app"`.
"""

from sparseseg.cli.app import app

# isort: off
from sparseseg.cli import prepare, backbone, experiment, compare, scribbles, scribblegen, annotate, labelstudio, report, extract  # noqa: F401
# isort: on

__all__ = ["app"]
