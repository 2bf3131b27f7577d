"""Pixel-to-region expansion (paper, appendix C.6): each click becomes one SAM point prompt, and the
best mask, when SAM trusts it (predicted IoU >= tau), labels a region with the click's class; or,
without SAM weights, the click's superpixel (or a region grown in backbone-feature space) does.

`base` holds the backend interface and SAM's geometry, `regions` the pure rules (tau, overlaps,
training draw), `sam_hf` and `sam_official` the two SAM backends, `superpixel` the image-only one,
`registry` picks one by name, `purity` measures regions against a ground truth.
See docs/expansion.md.
"""
