"""Write a directory all at once or not at all.

``with atomic_directory(target, overwrite=False) as tmp:`` — everything is
written into a fresh temp directory beside the target (same filesystem), which
is renamed into place only when the block finishes. An exception or Ctrl-C
(KeyboardInterrupt) removes the temp directory, so no half-written output is
ever seen under the target name; an existing target is refused unless
``overwrite``, and then replaced only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from steer.errors import SteerError


@contextmanager
def atomic_directory(target, *, overwrite: bool = False, what: str = "output", error=SteerError):
    """An empty existing directory counts as free; ``error`` is the SteerError subclass to raise."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise error(f"{what} path exists and is not a directory", where=str(target))
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise error(f"{what} directory already exists and is not empty; pass --overwrite (overwrite=True) to replace it",
                    where=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
