"""Labelling real images: queries out to an annotation tool, answers back in, a head and masks out.

A project folder holds the prepared images, a config (`project.yaml`) and one SQLite database
(`annotations.sqlite`) that records every query and every answer. Modules, one job each:

    layout.py     where things are in a project folder; reading its project.yaml (config.ProjectConfig)
    store.py      the SQLite store: schema, transactions, reads and writes
    coords.py     pixel <-> Label Studio percent / CVAT pixel coordinates (pixel centres)
    export.py     a round's queries as Label Studio tasks + labelling config, CVAT XML, CSV
    importers.py  Label Studio JSON, CVAT XML and CSV answer files -> raw answers
    review.py     crosshair PNGs of where the queried pixels are
    init.py       `sparseseg init`: a new project folder
    answers.py    an imported file's answers checked against queries, classes and stored answers
    regions.py    click regions in the database: expanded after import, read back for training and review
    project.py    query / import / train / predict / status: the round engine + the store + the exporters

The `sparseseg init|query|import|train|predict|status|export` commands are in `sparseseg/cli/annotate.py`.

See docs/annotation.md for the schema, the file formats and the guarantees.
"""
