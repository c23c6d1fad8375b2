"""Data commands: check image folders, write a synthetic phantom set.

    python -m hvdmri.data check Training [Testing] [--json report.json]
    python -m hvdmri.data synth phantoms --per-class 200 --image-size 128 --seed 0

Exit status: 0 on success; 1 when check finds a problem that would stop
training; 2 on invalid arguments or an output that cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hvdmri.cli import positive_int

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hvdmri.data",
                                     description="Check image folders or write a synthetic phantom set.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "check", help="report counts, sizes, unreadable files, duplicates and leaks",
        description="Read every image once, as training does, and report per class and split: counts, "
                    "sizes, stored modes, files skipped and why, exact and near duplicates, test images "
                    "duplicated in training, and label conflicts. Exits 1 only for problems that stop training.")
    check.add_argument("train_dir", metavar="DIR", help="training folder, one subfolder per class")
    check.add_argument("test_dir", metavar="TEST_DIR", nargs="?",
                       help="test folder to compare with DIR; classes may be missing")
    check.add_argument("--json", metavar="FILE", help="also write the full report to FILE as JSON")
    check.add_argument("--workers", type=positive_int, default=None,
                       help="decoding threads (default: the number of CPU cores)")
    check.add_argument("--no-progress", dest="progress", action="store_false",
                       help="hide the progress bar")

    synth = commands.add_parser(
        "synth", help="write a deterministic phantom set (OUT_DIR/Training and OUT_DIR/Testing)",
        description="Write synthetic MRI-like phantoms in the Kaggle layout. The same arguments give "
                    "the same bytes.")
    synth.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder to write into")
    synth.add_argument("--per-class", type=positive_int, default=200,
                       help="training images per class (default 200)")
    synth.add_argument("--test-per-class", type=positive_int, default=30,
                       help="test images per class (default 30)")
    synth.add_argument("--image-size", type=positive_int, default=128,
                       help="side of the square images in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def run_check(args: argparse.Namespace) -> int:
    from hvdmri.data.check import check_folders, format_report, write_json

    report = check_folders(args.train_dir, args.test_dir, workers=args.workers, progress=args.progress)
    print(format_report(report))
    if args.json:
        try:
            write_json(report, args.json)
        except OSError as error:
            print(f"hvdmri.data check: error: cannot write --json {args.json}: {error.strerror or error}",
                  file=sys.stderr)
            return EXIT_USAGE
    return EXIT_PROBLEMS if report["problems"] else 0


def run_synth(args: argparse.Namespace) -> int:
    from hvdmri.data.listing import CLASS_NAMES
    from hvdmri.data.synth import TEST_SEED_OFFSET, write_phantoms

    out_dir = Path(args.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        print(f"hvdmri.data synth: error: {out_dir} exists and is not an empty folder; "
              f"choose a new folder so old and new phantoms do not mix", file=sys.stderr)
        return EXIT_USAGE
    try:
        write_phantoms(out_dir / "Training", args.per_class, args.image_size, args.seed, prefix="Tr")
        write_phantoms(out_dir / "Testing", args.test_per_class, args.image_size,
                       args.seed + TEST_SEED_OFFSET, prefix="Te")
    except OSError as error:
        print(f"hvdmri.data synth: error: cannot write to {out_dir}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    classes = len(CLASS_NAMES)
    print(f"wrote {classes * args.per_class} training and {classes * args.test_per_class} test phantoms "
          f"({args.image_size} px, seed {args.seed}) to {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return run_check(args)
    return run_synth(args)


if __name__ == "__main__":
    sys.exit(main())
