"""Pixel-to-region expansion (paper, appendix C.6): each click becomes one SAM point prompt, and the
best mask, when SAM trusts it (predicted IoU >= tau), labels a region with the click's class.

`base` holds the backend interface and SAM's geometry, `regions` the pure rules (tau, overlaps,
training draw), `sam_hf` and `sam_official` the two backends, `registry` picks one by name.
See docs/expansion.md.
"""
