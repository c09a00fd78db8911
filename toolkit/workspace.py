"""Atomic publication of outputs.

Everything is written into a temporary directory beside the destination (same
file system) and moved into place only when complete, so an error or an
interrupt never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish(staging: Path, dest: Path, *, files: bool = False, overwrite: bool = False) -> None:
    """Move the staged output into place.

    Args:
        staging: The temporary directory holding the finished output.
        dest: Destination directory (``files=False``: ``staging`` becomes ``dest``)
            or destination file (``files=True``: ``staging/dest.name`` and its
            ``.data`` sidecar are moved next to ``dest``).
        files: Publish single files instead of a directory.
        overwrite: Replace an existing destination.
    """
    if files:
        for f in sorted(staging.iterdir()):
            if f.name == dest.name or f.name.startswith(dest.name + "."):
                os.replace(f, dest.parent / f.name)
        return
    if dest.exists():
        if not overwrite:
            from toolkit.errors import OutputExistsError

            raise OutputExistsError(f"output directory {str(dest)!r} already exists",
                                    hint="pass --overwrite or choose another directory")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)
