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
# weights, split or epoch numbering mean something else.
MUST_MATCH = ("weights", "image_size", "val_fraction", "seed", "limit_per_class", "head_epochs",
              "finetune_epochs", "finetune_from", "full_epochs", "scratch_epochs")


@dataclass
class ResumePoint:
    """The last completed epoch of an interrupted run, with its history and best epoch."""

    epoch: int  # epochs completed; training continues with epoch + 1
    phase: str
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    world_size: int | None = None  # workers of the run that wrote the checkpoint


def find_resume_point(run_dir: Path, config: dict) -> ResumePoint | None:
    """Return the resume point of run_dir, or None when it contains no checkpoint.

    Raises:
        UsageError: the folder contains a run whose configuration differs in a flag
            that decides the weights, the split or the epoch numbering.
    """
    state_path = run_dir / runs.CHECKPOINT_DIR / "state.json"
    last = run_dir / runs.CHECKPOINT_DIR / "last.weights.h5"
    if not state_path.is_file() or not last.is_file():
        return None
    state = runs.read_json(state_path)

    previous_config = {}
    if (run_dir / runs.CONFIG_FILE).is_file():
        previous_config = runs.read_json(run_dir / runs.CONFIG_FILE)
    changed = [f"--{key.replace('_', '-')} {previous_config[key]} -> {config[key]}"
               for key in MUST_MATCH if key in previous_config and previous_config[key] != config[key]]
    if changed:
        raise UsageError(f"--run-dir {run_dir} contains an interrupted run with different settings "
                         f"({'; '.join(changed)}); rerun with the same flags to resume, or choose "
                         f"another --run-dir")

    epoch = int(state["last_epoch"])
    return ResumePoint(epoch=epoch, phase=state["phase"], best=state.get("best", {}),
                       history=read_history(run_dir / runs.HISTORY_FILE, up_to_epoch=epoch),
                       world_size=previous_config.get("world_size"))


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
