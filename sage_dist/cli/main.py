"""``sage-dist``: erase a concept, generate side-by-side images, evaluate, and the bundled world's tools.

Examples (the bundled world is the default model)::

    sage-dist erase --concept triangle --out runs/triangle
    sage-dist generate --text-encoder runs/triangle --prompt "a red striped triangle" --out grid.png
    sage-dist evaluate --text-encoder runs/triangle --protocol world --concept triangle
    sage-dist world quality

Every config field of ``erase`` can be overridden with ``--section.field=value`` (``--erase.negative_guidance=2.0``);
an unknown key or a bad value is an error naming the field and what is allowed.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from sage_dist.cli import erase, evaluate, generate, world

COMMANDS = (erase, generate, evaluate, world)
"""Each sub-command module has ``register(subparsers)``; its parser sets ``func`` (and ``accepts_overrides``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-dist", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser

def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sage-dist`` console script.

    Returns the exit status: 0 success; 2 bad input or an unreachable tracking server (a message, no
    traceback; ``-v`` shows it); 1 a full disk (the message says what is intact); 130 / 143 interrupted
    (``erase`` saves a checkpoint first and prints how to resume).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "accepts_overrides", False):
            return int(args.func(args, extra) or 0)
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, ConnectionError) as err:  # bad input: a message
        if args.verbose:
            raise
        print(f"sage-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or args.verbose:
            raise
        print(f"sage-dist {args.command}: error: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sage-dist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
