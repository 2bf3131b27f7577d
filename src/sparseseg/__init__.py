"""sparseseg: choose the few pixels worth labelling, with diffusion-driven two-stage active learning."""

__version__ = "0.1.0"
