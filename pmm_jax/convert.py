"""`python -m pmm_jax.convert`: the command-line layer (flags, messages, exit codes) over
``pmm_jax.tools.weight_conversion``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pmm_jax.tools.weight_conversion import CONVERTERS, convert


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pmm_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(CONVERTERS))
    parser.add_argument("--src", required=True,
                        help="PyTorch state dict (.pth) or MXNet NDArray list (.params)")
    parser.add_argument("--structure", default=None, help="ScaleNet structure json")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    return parser.parse_args(argv)

def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 converted, 1 bad input: one paragraph
    ``error: ...`` naming the file on stderr, never a traceback)."""
    args = parse_args(argv)
    try:
        meta = convert(args.arch, os.path.expanduser(args.src), os.path.expanduser(args.out),
                       os.path.expanduser(args.structure) if args.structure else None)
    except (ValueError, OSError, ImportError, MemoryError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message} (--src={args.src})" if args.src not in message
              else f"error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
