"""The SAEs shipped inside the package: SmolLM2-135M-Instruct at several depths, pretrained, found by name.

``steer/data/saes/`` holds one SAELens v6 directory per site (16-bit weights)
and ``manifest.json``: the recipe that trained them (``configs/`` has it as
YAML), the corpus's per-source hashes, each SAE's held-out metrics and the
sha256 of every file. Names:

- ``default`` — the shipped SAE at the manifest's ``default_site`` (the one
  nearest the old single default SAE, resid_post.10);
- ``default:SITE`` (``default:resid_post.3``), or ``default`` with a site —
  the shipped SAE at that site.

This module only finds files: it never trains, never reads a model, never
writes (training the recipe again is `steer.train`'s business). Where the files
are (`SHIPPED_DIR`) and how they are hashed (`file_hashes`) come from
`steer.data`, which imports no torch.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from steer.data import SAES_DIR, file_hashes  # noqa: F401 (file_hashes: re-exported, as the manifest records them)
from steer.errors import SAEError

SHIPPED_DIR = SAES_DIR
MANIFEST = "manifest.json"
DEFAULT_NAME = "default"


@cache
def shipped_manifest() -> dict:
    """The parsed ``manifest.json`` of the shipped SAEs; SAEError when the package has none."""
    path = SHIPPED_DIR / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise SAEError("this steer has no shipped SAEs (a checkout without steer/data/saes?); reinstall steer or "
                       "pass an SAE path", where=str(path)) from None


def shipped_available() -> bool:
    """Whether this package carries shipped SAEs (a manifest in ``steer/data/saes``)."""
    return (SHIPPED_DIR / MANIFEST).is_file()


def shipped_sites() -> list[str]:
    return list(shipped_manifest()["saes"])


def is_shipped_name(name: str) -> bool:
    """``default`` or ``default:SITE``."""
    return name == DEFAULT_NAME or name.startswith(DEFAULT_NAME + ":")


def shipped_sae_dir(name: str = DEFAULT_NAME, site: str | None = None) -> Path:
    """The directory of the shipped SAE ``name`` (``default`` / ``default:SITE``), or at ``site``."""
    manifest = shipped_manifest()
    _, _, named_site = name.partition(":")
    site = named_site or site or manifest["default_site"]
    if site not in manifest["saes"]:
        raise SAEError(f"no shipped SAE at {site}; shipped sites: {', '.join(manifest['saes'])} (or pass an SAE path)",
                       where=f"sae {name}")
    return SHIPPED_DIR / manifest["saes"][site]["path"]
