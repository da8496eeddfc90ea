"""Offline bundles: everything a node without network needs, in one folder or tar file.

    OUT/manifest.json            size and sha256 of every file below, and what the bundle holds
    OUT/source.bundle            git bundle of the pinned upstream commit (or OUT/source/, a
                                 copy of a checkout git cannot bundle: sparse or partial)
    OUT/artifacts/sha256/ab/<h>  the model files, named by content (the cache's layout); none
                                 in a smoke bundle
    OUT/packages/pip/<h>/<file>  every locked file of the environments: the pip layer (and the
    OUT/packages/conda/<h>/...   venv stand-ins), conda archives where the lock has them, and
    OUT/packages/wheels/<file>   the platform wheels found in `wheel_dir`
    OUT/engine/                  the engine's own wheels, pinned by hash, for one Python
    OUT/src/ scripts/ pyproject.toml  the engine itself: OUT is a runnable checkout
    OUT/recipe/ patches/ env/ lock/   the project's data

`create.py` writes it (a folder by default, which a second create updates rewriting only
what changed, so rsync sends only that; or one tar). `manifest.py` is the trust boundary
every reader goes through. `restore.py` brings a bundle's bytes into the caches and the
deployment, hashing each one on its way in.
"""
