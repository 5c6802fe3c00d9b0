"""steer's bundled data (calibration text, the shipped SAEs' files) and corpus readers for SAE training (`steer.data.corpus`).

`SAES_DIR` and `file_hashes` live here, without torch, so that a fast path (the default atlas's pointer, read by
`steer features show`) can find and check the shipped SAEs' files; `steer.sae.shipped` finds them by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAES_DIR = Path(__file__).resolve().parent / "saes"
"""The shipped SAEs: one directory per site and ``manifest.json`` (see `steer.sae.shipped`)."""


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` (name → hex), as the shipped SAEs' manifest records them."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir()) if p.is_file()}
