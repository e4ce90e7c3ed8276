"""``python -m mlsys24.bench <name> [--quick] [--out DIR]``: run a registered GPU benchmark."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .registry import BENCHMARKS, resolve


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<22} {help_}" for name, (_, help_) in sorted(BENCHMARKS.items()))
    p = argparse.ArgumentParser(
        prog="python -m mlsys24.bench",
        description="Run a registered benchmark; results go to data/results/<name>/<device>.json.",
        epilog="registered benchmarks:\n" + listing
        + "\n\nfurther --flags after the name are passed to the benchmark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="benchmark to run (see the list below)")
    p.add_argument("--quick", action="store_true", help="small sizes, a minute or two; written as <device>.quick.json")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here instead of data/results/<name>/")
    p.add_argument("--list", action="store_true", help="print the registered benchmarks and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.extra = extra  # benchmark-specific flags, parsed by the benchmark itself
    if args.list or not args.name:
        for name, (_, help_) in sorted(BENCHMARKS.items()):
            print(f"{name:<22} {help_}")
        return 0 if args.list else 2
    try:
        fn = resolve(args.name)
    except KeyError as e:
        parser.error(str(e.args[0]))
    path = fn(args)
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
