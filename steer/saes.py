"""An SAE by path or by name: where the name ``default`` is resolved, above `steer.sae` and `steer.train`.

`steer.sae` reads and writes SAE files and never trains; `steer.train` trains
them (and reads them through `steer.sae`). Resolving the default SAE can need
both — the shipped files, or in a checkout that ships none the former one-site
recipe trained on first use — so it lives here, above the two, and nothing in
`steer.sae` imports `steer.train`.

`load_sae` is what ``steer.load_sae``, a spec's ``sae:`` (the compiler),
``--sae`` and ``steer sae inspect`` / ``eval`` and the demo go through:

- a local path (any format `steer.sae.load_sae` reads) is read as it is;
- ``default`` (when no file of that name exists) is the default model's default
  SAE: SmolLM2-135M-Instruct at ``resid_post.10``, shipped pretrained in the
  package (`steer.sae.shipped`), 16-bit on disk and loaded in float32; with
  ``site`` it is the shipped SAE at that site. In a checkout that ships none it
  is `steer.train.default.ONE_SITE_RECIPE`, trained once and cached
  (`steer.train.default_sae`);
- ``default:SITE`` is the shipped SAE at SITE (never trained);
- anything else is a hub name, which `steer.sae.resolve_hub_name` refuses today.

`default_sae_dir` is the directory behind a default name, for callers that key
caches on the files (the feature atlas).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from steer import sae as sae_files
from steer.sae import SAE
from steer.sae.shipped import (
    DEFAULT_NAME,
    SHIPPED_DIR,
    is_shipped_name,
    shipped_available,
    shipped_sae_dir,
)

DEFAULT_SAE = DEFAULT_NAME
"""The name `load_sae` (and a spec's ``sae:``, and ``--sae``) reads as the default model's default SAE."""

__all__ = ["DEFAULT_SAE", "default_sae_dir", "is_default_name", "load_sae"]


def is_default_name(path_or_name: str | os.PathLike) -> bool:
    """Whether ``path_or_name`` names a default SAE (``default``, ``default:SITE``) rather than a local path."""
    return is_shipped_name(str(path_or_name)) and not Path(path_or_name).expanduser().exists()


def default_sae_dir(name: str = DEFAULT_SAE, site: str | None = None, *, progress: bool = True) -> Path:
    """The directory of the default SAE ``name`` (``default``, ``default:SITE``; ``site`` picks a shipped depth):
    the shipped one, or — for ``default`` in a checkout that ships none — the one-site recipe's, trained once."""
    if shipped_available() or name != DEFAULT_SAE:
        return shipped_sae_dir(name, site)  # pretrained, in the package: never trains (says so when none ship)
    from steer.train.default import default_sae

    return default_sae(progress=progress)


def load_sae(path_or_name: str | os.PathLike, site: str | None = None, *, dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE at a local path or of a default name (see the module docstring), cast to ``dtype`` if given.

    ``site`` overrides whatever site the file names; with a shipped default name it picks the shipped SAE at
    that site instead.
    """
    if not is_default_name(path_or_name):
        return sae_files.load_sae(path_or_name, site, dtype=dtype)
    directory = default_sae_dir(str(path_or_name), site)
    if directory.is_relative_to(SHIPPED_DIR):  # shipped in 16 bits; computed in fp32 like a model
        return sae_files.load_sae(directory, dtype=dtype or torch.float32)
    return sae_files.load_sae(directory, site, dtype=dtype)  # the trained fallback: ``site`` relabels it, as before
