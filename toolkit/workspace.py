"""Atomic publication of outputs.

Everything is written into a temporary directory beside the destination (same
file system) and moved into place only when complete, so an error or an
interrupt never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class Interrupts:
    """``with Interrupts() as guard:`` SIGINT and SIGTERM unwind as KeyboardInterrupt
    (``.signum`` set: the CLI exits 128 + signum), so temporary outputs are removed.
    The record survives a library that catches the interrupt and carries on (the torch
    exporter retries with another strategy after an exception): an exception leaving
    the block after a signal becomes the interrupt again, and :meth:`check` raises it
    before anything is published."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self._previous: dict[int, object] = {}

    @staticmethod
    def _interrupt(signum: int) -> KeyboardInterrupt:
        exc = KeyboardInterrupt()
        exc.signum = signum
        return exc

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)
        raise self._interrupt(signum)

    def check(self) -> None:
        """Raise the interrupt if a signal came, whatever caught it since."""
        if self.signals:
            raise self._interrupt(self.signals[0])

    def __enter__(self) -> Interrupts:  # noqa: PYI034 (typing.Self needs Python 3.11)
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # (only it may set handlers)
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if kind is not None and issubclass(kind, Exception) and self.signals:
            raise self._interrupt(self.signals[0]) from None  # a library caught the interrupt and failed on it


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output path whose nearest existing ancestor is a file
    or cannot be written (a read-only mount, no permission): it used to end in an
    OSError traceback, for parity reports only after the whole run."""
    from toolkit.errors import OutputExistsError

    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputExistsError(f"cannot write {str(path)!r}: {str(ancestor)!r} is a file, not a directory",
                                hint="choose a path whose parent directories are directories")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write {str(path)!r}: {str(ancestor) or '.'!r} is not writable "
                                "(read-only file system or no permission)",
                                hint="choose an output path in a writable directory")


def check_report_paths(paths: dict[str, str | Path | None], inputs: tuple[str | Path | None, ...] = ()) -> None:
    """Refuse, before any work, report files (flag -> path; None and '-' skipped) that
    could not be written or would destroy something: an existing directory (it ended
    in an IsADirectoryError traceback after the whole run), one of the command's
    `inputs` or a file beside them that belongs to a model (an existing ``*.onnx`` or
    ``*.onnx.data``: `parity --json MODEL.onnx` replaced the model it had just passed),
    or the same file named by two flags."""
    from toolkit.errors import OutputExistsError

    given = {flag: Path(p) for flag, p in paths.items() if p and str(p) != "-"}
    protected = {Path(p).resolve() for p in inputs if p}
    seen: dict[Path, str] = {}
    for flag, path in given.items():
        resolved = path.resolve()
        if path.is_dir():
            raise OutputExistsError(f"{flag} {str(path)!r} is a directory; it names the report file itself",
                                    hint=f"e.g. {flag} {str(path / ('report' + (path.suffix or '.json')))!r}")
        if resolved in protected or (path.is_file() and (path.name.endswith(".onnx")
                                                         or path.name.endswith(".onnx.data"))):
            raise OutputExistsError(f"{flag} {str(path)!r} would overwrite a model file with the report",
                                    hint=f"name a new file, e.g. {flag} report.json")
        if resolved in seen:
            raise OutputExistsError(f"{seen[resolved]} and {flag} both name {str(path)!r}",
                                    hint="give each report its own file")
        seen[resolved] = flag
        check_writable(path)


def check_destination(dest: Path, *, directory: bool, overwrite: bool, keep: tuple[str | Path, ...] = (),
                      marker: str = "manifest.json") -> None:
    """Refuse an output path :func:`publish` could not use, before any work is done:
    the current directory or one of its parents, a path under an existing file, a
    directory where a file is written, or an existing output without ``overwrite``.

    ``overwrite`` replaces only what this toolkit wrote there before: an existing
    output directory must hold ``marker`` (a bundle's ``manifest.json``; a Triton
    model's ``config.pbtxt``) or be empty, must not be a file, and must not be or
    contain a path of ``keep`` (the source model, when it names an existing path). It
    used to replace any directory, e.g. ``convert DIR -o DIR/.. --overwrite`` deleted
    the source and its neighbours.
    """
    from toolkit.errors import OutputExistsError

    here = Path.cwd().resolve()
    if dest.resolve() in (here, *here.parents):
        raise OutputExistsError(f"output {str(dest)!r} is the current directory or one of its parents",
                                hint="name a new directory, e.g. -o out/model")
    if dest.name in ("", ".", ".."):
        raise OutputExistsError(f"output {str(dest)!r} ends in {dest.name or '/'!r}: name the output itself",
                                hint="e.g. -o out/model")
    check_writable(dest)
    if dest.exists():
        if not overwrite:
            what = "output directory" if directory and dest.is_dir() else "output"
            raise OutputExistsError(f"{what} {str(dest)!r} already exists",
                                    hint="pass --overwrite to replace it, or choose another path")
        if not directory and dest.is_dir():
            raise OutputExistsError(f"output {str(dest)!r} is a directory; this command writes one file",
                                    hint=f"name a file, e.g. -o {dest / 'model.onnx'}")
        if directory and not dest.is_dir():
            raise OutputExistsError(f"output {str(dest)!r} is a file; this command writes a directory",
                                    hint="name a new directory, e.g. -o out/model")
        target = dest.resolve()
        for path in map(Path, keep):
            if not path.exists():  # a model name (llama, hf:qwen2), not a path
                continue
            path = path.resolve()
            if path == target or target in path.parents:
                raise OutputExistsError(f"--overwrite would delete {str(path)!r}, the model being converted: it is "
                                        f"{'the' if path == target else 'inside the'} output {str(dest)!r}",
                                        hint="write the output somewhere else, e.g. -o out/model")
            if not directory and path in target.parents:  # a file of the source (its config.json, weights)
                raise OutputExistsError(f"--overwrite would replace {str(dest)!r}, a file of the model being "
                                        f"exported ({str(path)!r})",
                                        hint="write the output somewhere else, e.g. -o out/model.onnx")
        if directory and not (dest / marker).is_file() and any(dest.iterdir()):
            raise OutputExistsError(f"output directory {str(dest)!r} holds files this toolkit did not write (no "
                                    f"{marker}): --overwrite replaces only a previous output",
                                    hint="choose a new directory, or remove this one yourself")


def _readable_files(root: Path) -> None:
    """Give every file under ``root`` the read bits a new file gets (0o444 less the
    umask): onnx writes external data 0600, so a model server running as another
    user could open model.onnx but not its weights."""
    read = 0o444 & ~_umask()
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(f.stat().st_mode | read)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_files(staging: Path, dest: Path, *, overwrite: bool) -> None:
    """Move ``staging/dest.name`` and its sidecars (``dest.name + ".data"``, the
    external weights) next to ``dest``.

    Guarantee: a reader opening ``dest`` and its sidecar by name never finds the new
    model beside the old weights or the old model beside the new ones. A model alone
    (no sidecar on either side) is one atomic rename. When the new model has a sidecar
    the old one has too, the old pair is first moved into ``staging``, then the new
    sidecars and the new model are moved in: ``dest`` is absent between these renames
    (a reader gets "no such file", not a mismatched pair). If a rename fails (or an
    interrupt arrives), the new files are removed and the old pair is moved back; a
    process killed between the renames leaves the old pair in ``staging``. (Not
    covered: a reader that opened the old model before the swap and its weights
    after; the file names are fixed, so only a bundle directory swaps both at once.)
    Before, the weights were replaced first, so the old model sat beside the new
    weights, for good when the model's rename then failed.
    """
    sidecars = sorted(f for f in staging.iterdir() if f.name.startswith(dest.name + ".") and f.is_file())
    moved_aside: list[tuple[Path, Path]] = []  # (original path, where it is kept meanwhile)
    placed: list[Path] = []
    try:
        clashing = [dest.parent / f.name for f in sidecars if (dest.parent / f.name).exists()]
        if clashing and dest.exists():
            for path in (dest, *clashing):  # the model first: it names the weights
                kept = staging / f".old-{path.name}"
                os.replace(path, kept)
                moved_aside.append((path, kept))
        for f in sidecars:
            os.replace(f, dest.parent / f.name)
            placed.append(dest.parent / f.name)
        os.replace(staging / dest.name, dest)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        for path, kept in reversed(moved_aside):
            os.replace(kept, path)
        raise
    for _, kept in moved_aside:
        kept.unlink(missing_ok=True)
    # a sidecar of the replaced model that the new one does not have goes (an
    # --overwrite of a large model by a small one left it behind); the new model
    # names no such file, so it may go after the model is in place
    stale = dest.parent / (dest.name + ".data")
    if overwrite and stale.name not in {f.name for f in sidecars} and stale.is_file():
        stale.unlink()


def publish(staging: Path, dest: Path, *, files: bool = False, overwrite: bool = False,
            mode: int | None = None) -> None:
    """Move the staged output into place.

    Args:
        staging: The temporary directory holding the finished output.
        dest: Destination directory (``files=False``: ``staging`` becomes ``dest``)
            or destination file (``files=True``: ``staging/dest.name`` and its
            ``.data`` sidecar are moved next to ``dest``).
        files: Publish single files instead of a directory.
        overwrite: Replace an existing destination.
        mode: Permissions of the published directory (default: a new directory's,
            0o777 less the umask; ``tempfile.mkdtemp`` made the staging one 0700).
    """
    _readable_files(staging)
    if files:
        _publish_files(staging, dest, overwrite=overwrite)
        return
    # A server running as another user must be able to read the published directory.
    staging.chmod(0o777 & ~_umask() if mode is None else mode)
    if dest.exists():
        if not overwrite:
            from toolkit.errors import OutputExistsError

            raise OutputExistsError(f"output directory {str(dest)!r} already exists",
                                    hint="pass --overwrite or choose another directory")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(staging, dest)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(staging, dest)
