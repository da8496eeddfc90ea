"""sdrecipe: deploy CompVis/stable-diffusion on an HPC cluster from a pinned, patched, locked recipe."""

__version__ = "0.1.0"
