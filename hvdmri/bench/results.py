"""Read the JSON lines that python -m hvdmri.bench --out writes. Standard library only."""

from __future__ import annotations

import json


def read_results(paths: list[str], required: tuple[str, ...]) -> list[dict]:
    """Return the successful runs in the files, each checked for the required fields.

    Lines with an "error" field are failed runs and are left out.

    Raises:
        ValueError: a file cannot be read, or a line is not a JSON object with the
            required fields. The message names the file and line number.
    """
    runs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as stream:
                texts = stream.readlines()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}") from error
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not a text file of JSON lines") from error
        for number, text in enumerate(texts, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not JSON ({error.msg})") from error
            if not isinstance(line, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(line).__name__}")
            if "error" in line:
                continue
            missing = [key for key in required if key not in line]
            if missing:
                raise ValueError(f"{path} line {number}: not a benchmark run, missing {', '.join(missing)}")
            runs.append(line)
    return runs


def single_worker_runs(lines: list[dict]) -> list[dict]:
    """Keep the successful hvdmri-mode runs of one worker, which the memory fit and scaling start from."""
    return [line for line in lines
            if "error" not in line and line.get("mode") == "hvdmri" and line.get("world_size") == 1]
