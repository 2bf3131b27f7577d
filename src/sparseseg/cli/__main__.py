"""`python -m sparseseg.cli ...`: the same app as the `sparseseg` command (compare's workers use it)."""

from sparseseg.cli import app

app()
