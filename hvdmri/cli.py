"""Command-line helpers shared by the hvdmri commands: a one-line-error parser and value types."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from hvdmri.distributed import UsageError, env_rank


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, printed by rank 0 only.

    Under horovodrun every rank parses the same flags; one message is enough.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        if env_rank() == 0:
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def command_parser(prog: str, description: str, examples: str) -> CommandParser:
    """Return the parser every hvdmri command starts from: one-line errors, examples after the flags."""
    return CommandParser(prog=prog, description=description, epilog=examples,
                         formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """Add --model RUN_DIR, the trained run folder that evaluate and predict read."""
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="run folder written by hvdmri.train (contains model.keras and classes.json)")


def run_command(name: str, command: Callable[[], object]) -> int:
    """Run a command's work; turn a UsageError into one line on stderr (rank 0) and exit code 2."""
    try:
        command()
    except UsageError as error:
        if env_rank() == 0:
            print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _number(text: str, kind, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer, 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """Parse a finite number above 0, such as a learning rate."""
    value = _number(text, float, "a number above 0")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """Parse a finite number of 0 or more, such as a number of warm-up epochs."""
    value = _number(text, float, "a number, 0 or more")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def open_unit_interval(text: str) -> float:
    """Parse a number strictly between 0 and 1, such as a moving-average momentum."""
    value = _number(text, float, "a number between 0 and 1")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1): a share that must leave something on the other side."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def probability(text: str) -> float:
    value = _number(text, float, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def image_size(text: str) -> int:
    value = _number(text, int, "a whole number of pixels")
    if value < 32:
        raise argparse.ArgumentTypeError(f"ResNet-50 needs at least 32 pixels, got {text}")
    return value
