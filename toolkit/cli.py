"""The ``toolkit`` command line.

One module per command in :mod:`toolkit.commands`, each with ``register(parser)``
and ``run(args) -> int``; heavy imports happen inside ``run`` so ``--help`` is instant.
User errors (:class:`toolkit.errors.ToolkitError`) print one paragraph, no
traceback (``--traceback`` shows it), and exit non-zero.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from toolkit import __version__
from toolkit.errors import ToolkitError

COMMANDS = ("export", "convert", "parity", "inspect", "list_passes", "generate", "bench", "package")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit",
        description="Export PyTorch transformers to ONNX, rewrite them onto fused custom operators, "
        "and check numerical parity against the original model.",
    )
    parser.add_argument("--version", action="version", version=f"toolkit {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"toolkit.commands.{name}")
        p = sub.add_parser(name.replace("_", "-"), help=module.__doc__.strip().splitlines()[0],
                           description=module.__doc__)
        module.register(p)
        p.set_defaults(_run=module.run)
    return parser


# Commands whose outputs are published atomically (nothing is left by an interrupt).
_ATOMIC_COMMANDS = {"convert", "export", "package", "parity"}

_FILE_SYSTEM_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _broken_pipe() -> int:
    # The reader went away (`toolkit inspect --json | head`): stop quietly, and keep
    # Python's exit-time flush of stdout from raising again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills optional positionals only from the first run of positionals, so
    # `parity hf:llama --config k=v out/model.onnx` left OPTIMIZED.onnx unset and the
    # path "unrecognized": a command lists such positionals to take from what is left.
    for name in getattr(args, "_late_positionals", ()):
        if getattr(args, name) is None and extra and not extra[0].startswith("-"):
            setattr(args, name, extra.pop(0))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except ToolkitError as err:
        if args.traceback:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as exc:
        # convert / export / package / parity publish atomically; generate streams tokens
        partial = getattr(exc, "partial_output", None)
        print("interrupted" + (": the tokens above are a partial completion" if partial else
                               ": no output was written" if args.command in _ATOMIC_COMMANDS else ""),
              file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # the shell's code: 130 for SIGINT, 143 for SIGTERM
    except BrokenPipeError:
        return _broken_pipe()
    except OSError as err:
        # The file system refused (a read-only mount, no permission, a full disk) where
        # the up-front checks could not foresee it: a named error, not a traceback.
        if args.traceback or err.errno not in _FILE_SYSTEM_ERRORS:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot access{where}: {err.strerror}\n  fix: check the path's permissions, that its file "
              "system is writable and has free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
