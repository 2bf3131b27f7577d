"""Scribble maps: label maps with class ids on scribbled pixels and 255 everywhere else.

`io` reads and writes them as PNGs, `simulate` draws seeded scribbles from dense masks, and
`from_labels` turns sparseseg's own clicks (a run's labels.csv) into scribble maps.
"""
