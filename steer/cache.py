"""Where steer caches what is expensive to make: converted models, trained SAEs, atlases, vLLM's virtualenv.

``$STEER_CACHE``, else ``~/.cache/steer``. A module of its own, without torch, so
that fast paths (``steer features show``) can find the cache without loading it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("STEER_CACHE") or Path.home() / ".cache" / "steer")
