"""Resuming an interrupted run from its last completed epoch.

Rerunning the same command with the same --run-dir continues where the run
stopped: rank 0 reads checkpoints/state.json, and every rank receives the resume
epoch with the training plan. The per-epoch checkpoint contains the weights and the
optimizer state (Adam moments and step count), so the optimizer continues too.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from hvdmri import runs
from hvdmri.distributed import UsageError

# Flags that must match the interrupted run: changing them would make the saved
# weights, split, epoch numbering or learning-rate schedule mean something else.
# Runtime flags (threads, precision, --no-fused-relu, --fp16-allreduce) and the number of
# workers may change.
MUST_MATCH = ("data", "exclude_duplicates_of", "weights", "image_size", "batch_size", "val_fraction", "seed",
              "limit_per_class", "augment", "head_epochs", "head_lr", "finetune_epochs", "finetune_lr",
              "finetune_from", "full_epochs", "full_lr", "scratch_epochs", "scratch_lr",
              "scratch_bn_momentum", "warmup_epochs")


@dataclass
class ResumePoint:
    """The last completed epoch of an interrupted run, with its history and best epoch."""

    epoch: int  # epochs completed; training continues with epoch + 1
    phase: str
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    world_size: int | None = None  # workers of the run that wrote the checkpoint
    # A clean stop inside epoch + 1: the steps of that epoch already done, the
    # checkpoint written after them, and that epoch's metric sums so far.
    step: int = 0
    steps_per_epoch: int | None = None  # of the stopped run; None in runs from before it was recorded
    checkpoint: str = "last.weights.h5"
    metric_sums: dict = field(default_factory=dict)


def find_resume_point(run_dir: Path, config: dict) -> ResumePoint | None:
    """Return the resume point of run_dir, or None when it contains no checkpoint.

    Raises:
        UsageError: the folder contains a run whose configuration differs in a flag
            that decides the weights, the split or the epoch numbering.
    """
    from hvdmri.stopping import STOPPED_CHECKPOINT

    state_path = run_dir / runs.CHECKPOINT_DIR / "state.json"
    if not state_path.is_file():
        return None
    state = runs.read_json(state_path)
    stopped = state.get("stopped")
    if stopped and not (run_dir / runs.CHECKPOINT_DIR / STOPPED_CHECKPOINT).is_file():
        stopped = None
    # state.json names the epoch's own file; last.weights.h5 is the same file, or the
    # only one in runs from before epoch files existed.
    checkpoint = state.get("checkpoint", "last.weights.h5")
    if not (run_dir / runs.CHECKPOINT_DIR / checkpoint).is_file():
        checkpoint = "last.weights.h5"
    if not stopped and not (run_dir / runs.CHECKPOINT_DIR / checkpoint).is_file():
        return None

    previous_config = {}
    if (run_dir / runs.CONFIG_FILE).is_file():
        previous_config = runs.read_json(run_dir / runs.CONFIG_FILE)
    changed = [describe_change(key, previous_config[key], config[key])
               for key in MUST_MATCH if key in previous_config and previous_config[key] != config[key]]
    if changed:
        raise UsageError(f"--run-dir {run_dir} contains an interrupted run with different settings "
                         f"({'; '.join(changed)}); rerun with the same flags to resume, or choose "
                         f"another --run-dir")

    epoch = int(state["last_epoch"])
    point = ResumePoint(epoch=epoch, phase=state["phase"], best=state.get("best", {}),
                        history=read_history(run_dir / runs.HISTORY_FILE, up_to_epoch=epoch),
                        world_size=previous_config.get("world_size"), checkpoint=checkpoint)
    if stopped and int(stopped["epoch"]) == epoch + 1:
        point.step = int(stopped["step"])
        point.steps_per_epoch = stopped.get("steps_per_epoch")
        point.checkpoint = STOPPED_CHECKPOINT
        point.metric_sums = stopped.get("metric_sums", {})
    return point


def describe_change(key: str, before, after) -> str:
    """Name a changed setting by its command-line flag, e.g. "--batch-size 16 -> 32"."""
    if key == "augment":
        # The flag is --no-augment; there is no --augment.
        return f"--no-augment {'given' if before is False else 'not given'} -> " \
               f"{'given' if after is False else 'not given'}"
    return f"--{key.replace('_', '-')} {before} -> {after}"


def read_history(path: Path, up_to_epoch: int) -> list[dict]:
    """Read history.csv rows up to and including up_to_epoch, numbers as numbers."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["epoch"]) > up_to_epoch:
                break
            parsed: dict = {"epoch": int(row["epoch"]), "phase": row["phase"]}
            for key, value in row.items():
                if key not in parsed:
                    parsed[key] = float(value) if value not in ("", None) else float("nan")
            rows.append(parsed)
    return rows


def weights_checksum(variables) -> str:
    """Return a short SHA-256 of the variables' bytes, to compare ranks after a restore."""
    digest = hashlib.sha256()
    for variable in variables:
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()[:16]
