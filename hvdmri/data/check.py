"""The dataset check: one pass over a training folder and, optionally, a test folder.

Every image is listed by hvdmri.data.listing and decoded by hvdmri.data.decode,
exactly as training reads it, and fingerprinted for duplicate detection
(hvdmri.data.duplicates states the rules). The report, on screen and as JSON,
contains:

- images per class and split, the image sizes and the channel modes the files store;
- files skipped, with the stage (listing or decode) and the reason, and files
  ignored (hidden, system or non-image files, symbolic links to folders);
- warnings about usable files: a PNG named .jpg, an image smaller than 32 px;
- exact duplicates (byte-identical files), within and across splits;
- near duplicates across splits, and the test images that have any duplicate in training;
- duplicate groups whose images carry more than one class (label conflicts).

Only "problems" make the check fail: a folder that cannot be listed, or a
training class left without a decodable image. Both stop training. Duplicates,
conflicts and skipped files are reported, because training runs with them.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from hvdmri.data.decode import DecodeError
from hvdmri.data.duplicates import (NEAR_MAX_HAMMING, NEAR_MIN_CORRELATION, Fingerprints, ImageFingerprint,
                                    fingerprint_file, group_ids, map_in_threads, near_duplicate_pairs)
from hvdmri.data.listing import CLASS_NAMES, Listing, list_images

# ResNet-50 in this project takes inputs of 32 px or more (--image-size); a
# smaller image is upsampled, which invents detail the scan never had.
MIN_IMAGE_SIDE = 32
# Examples shown on screen per list; the JSON report contains every entry.
SCREEN_EXAMPLES = 10
# Enough of a JPEG to reach its frame header past the usual EXIF and ICC blocks.
_HEADER_BYTES = 64 * 1024

_PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_JPEG_COMPONENTS = {1: "grayscale", 3: "RGB", 4: "CMYK"}
# Start-of-frame markers of every JPEG coding process (not DHT C4, JPG C8, DAC CC).
_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def stored_mode(path: str | os.PathLike) -> str:
    """Return the format, colour model and bit depth a file stores, e.g. "PNG palette 8-bit".

    The decoder turns every mode into 8-bit RGB, so this is the only record of the original.
    """
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_BYTES)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 26:
        # IHDR is always the first chunk: bit depth at byte 24, colour type at 25.
        colour = _PNG_COLOUR_TYPES.get(head[25], f"colour type {head[25]}")
        return f"PNG {colour} {head[24]}-bit"
    if head.startswith(b"\xff\xd8"):
        return _jpeg_mode(head)
    return "unknown format"


def _jpeg_mode(head: bytes) -> str:
    position = 2
    while position + 10 <= len(head):
        if head[position] != 0xFF:
            break
        marker = head[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_FRAME_MARKERS:
            precision, components = head[position + 4], head[position + 9]
            return f"JPEG {_JPEG_COMPONENTS.get(components, f'{components}-component')} {precision}-bit"
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            position += 2
            continue
        position += 2 + int.from_bytes(head[position + 2:position + 4], "big")
    return "JPEG (frame header not found in the first 64 KiB)"


@dataclass
class _Entry:
    """One listed image of either split, and what the pass found."""

    split: str
    path: str
    label: int
    fingerprint: ImageFingerprint | None = None
    mode: str = ""
    error: str = ""


def _inspect(listing: Listing, entry: _Entry) -> _Entry:
    path = listing.absolute(entry.path)
    try:
        entry.mode = stored_mode(path)
        entry.fingerprint = fingerprint_file(path)
    except OSError as error:
        entry.error = f"cannot read file ({error.strerror or error})"
    except DecodeError as error:
        entry.error = str(error).removeprefix(f"{path}: ")
    return entry


def _list_folder(folder: str | os.PathLike, split: str, problems: list[str]) -> Listing | None:
    """List a folder; on failure record the problem and return what can still be listed."""
    try:
        return list_images(folder, require_all=(split == "train"))
    except ValueError as error:
        problems.append(f"{split} folder: {error}")
    if split == "train":
        try:
            # A missing or empty class stops training, but the other classes are still worth checking.
            return list_images(folder, require_all=False)
        except ValueError:
            pass
    return None


def check_folders(train_dir: str | os.PathLike, test_dir: str | os.PathLike | None = None,
                  workers: int | None = None, progress: bool = True) -> dict:
    """Check a training folder and an optional test folder; return the report as a dict.

    The keys are described in the module docstring; report["problems"] lists
    what would stop training and is empty when training can run.
    """
    started = time.time()
    problems: list[str] = []
    listings: dict[str, Listing] = {}
    folders = {"train": train_dir, "test": test_dir}
    for split, folder in folders.items():
        if folder is not None:
            listing = _list_folder(folder, split, problems)
            if listing is not None:
                listings[split] = listing

    entries = [_Entry(split, path, label) for split, listing in listings.items()
               for path, label in zip(listing.paths, listing.labels)]
    entries = map_in_threads(lambda entry: _inspect(listings[entry.split], entry), entries, workers,
                             progress="check" if progress else None)

    report = {
        "train_dir": str(Path(train_dir).resolve()),
        "test_dir": str(Path(test_dir).resolve()) if test_dir is not None else None,
        "class_names": list(CLASS_NAMES),
        "near_duplicate_rule": {"max_hamming_distance": NEAR_MAX_HAMMING, "hash_bits": 64,
                                "min_thumbnail_correlation": NEAR_MIN_CORRELATION},
        "splits": {split: _split_summary(listing, [e for e in entries if e.split == split])
                   for split, listing in listings.items()},
        "skipped": _skipped(listings, entries),
        "ignored": [{"split": split, "path": path, "reason": reason}
                    for split, listing in listings.items() for path, reason in listing.ignored],
        "warnings": _warnings(listings, entries),
    }
    report.update(_duplicates(entries))

    train = report["splits"].get("train")
    if train is not None:
        empty = [name for name, count in train["per_class"].items() if count == 0]
        # A class the listing found empty or missing is a problem already.
        listed_cleanly = not any(problem.startswith("train folder:") for problem in problems)
        if empty and listed_cleanly:
            problems.append(f"train folder: no decodable images in class folder(s) {', '.join(empty)}; "
                            f"training stops on this (see the skipped files)")
    report["problems"] = problems
    report["seconds"] = round(time.time() - started, 2)
    return report


def _split_summary(listing: Listing, entries: list[_Entry]) -> dict:
    decoded = [entry for entry in entries if entry.fingerprint is not None]
    per_class = {name: 0 for name in listing.class_names}
    for entry in decoded:
        per_class[listing.class_names[entry.label]] += 1
    sizes = Counter(f"{entry.fingerprint.width}x{entry.fingerprint.height}" for entry in decoded)
    modes = Counter(entry.mode for entry in decoded)
    return {
        "folder": str(listing.root),
        "images": len(decoded),
        "per_class": per_class,
        "sizes": dict(sizes.most_common()),
        "modes": dict(modes.most_common()),
    }


def _skipped(listings: dict[str, Listing], entries: list[_Entry]) -> list[dict]:
    skipped = [{"split": split, "path": path, "stage": "listing", "reason": reason}
               for split, listing in listings.items() for path, reason in listing.skipped]
    skipped += [{"split": entry.split, "path": entry.path, "stage": "decode", "reason": entry.error}
                for entry in entries if entry.error]
    return skipped


def _warnings(listings: dict[str, Listing], entries: list[_Entry]) -> list[dict]:
    warnings = []
    for entry in entries:
        if entry.fingerprint is None:
            continue
        suffix = Path(entry.path).suffix.lower()
        if entry.mode.startswith("PNG") and suffix in (".jpg", ".jpeg"):
            warnings.append((entry, f"PNG content in a {suffix} file (decoded by its content)"))
        elif entry.mode.startswith("JPEG") and suffix == ".png":
            warnings.append((entry, "JPEG content in a .png file (decoded by its content)"))
        shortest = min(entry.fingerprint.height, entry.fingerprint.width)
        if shortest < MIN_IMAGE_SIDE:
            warnings.append((entry, f"only {entry.fingerprint.width}x{entry.fingerprint.height} px: "
                                    f"upsampled to the model input, with no real detail"))
    return [{"split": entry.split, "path": entry.path, "warning": text} for entry, text in warnings]


def _duplicates(entries: list[_Entry]) -> dict:
    """Find exact and near duplicates among all decoded images of both splits."""
    decoded = [entry for entry in entries if entry.fingerprint is not None]
    prints = Fingerprints.from_images([entry.path for entry in decoded], [entry.fingerprint for entry in decoded])

    def member(k: int) -> dict:
        return {"split": decoded[k].split, "path": decoded[k].path, "class": CLASS_NAMES[decoded[k].label]}

    def scope(members: list[int]) -> str:
        splits = {decoded[k].split for k in members}
        return "across" if len(splits) > 1 else f"within_{splits.pop()}"

    by_digest: dict[str, list[int]] = defaultdict(list)
    for k, digest in enumerate(prints.sha256):
        by_digest[digest].append(k)
    exact_groups = [members for members in by_digest.values() if len(members) > 1]
    exact_scopes = Counter(scope(members) for members in exact_groups)

    near = near_duplicate_pairs(prints)
    near_scopes = Counter(scope([i, j]) for i, j, _, _ in near if prints.sha256[i] != prints.sha256[j])
    near_across = []
    for i, j, distance, correlation in near:
        if decoded[i].split == decoded[j].split or prints.sha256[i] == prints.sha256[j]:
            continue
        test, train = (i, j) if decoded[i].split == "test" else (j, i)
        near_across.append({"test": decoded[test].path, "test_class": CLASS_NAMES[decoded[test].label],
                            "train": decoded[train].path, "train_class": CLASS_NAMES[decoded[train].label],
                            "hamming": distance, "correlation": correlation})

    exact_leaks = {decoded[k].path for members in exact_groups if scope(members) == "across"
                   for k in members if decoded[k].split == "test"}
    near_leaks = {pair["test"] for pair in near_across} - exact_leaks

    # Groups as the split uses them: exact and near duplicates joined transitively.
    pairs = [(members[0], k) for members in exact_groups for k in members[1:]]
    pairs += [(i, j) for i, j, _, _ in near]
    groups: dict[int, list[int]] = defaultdict(list)
    for k, group in enumerate(group_ids(len(decoded), pairs)):
        groups[group].append(k)
    joined = [members for members in groups.values() if len(members) > 1]
    exact_conflicts = {frozenset(members) for members in exact_groups
                       if len({decoded[k].label for k in members}) > 1}
    conflicts = []
    for members in joined:
        if len({decoded[k].label for k in members}) > 1:
            exact = any(group <= set(members) for group in exact_conflicts)
            conflicts.append({"match": "exact" if exact else "near", "members": [member(k) for k in members]})

    return {
        "exact_duplicates": {
            "groups": len(exact_groups),
            "files": sum(len(members) for members in exact_groups),
            "within_train": exact_scopes["within_train"],
            "within_test": exact_scopes["within_test"],
            "across": exact_scopes["across"],
            "members": [[member(k) for k in members] for members in exact_groups],
        },
        "near_duplicates": {
            "pairs_within_train": near_scopes["within_train"],
            "pairs_within_test": near_scopes["within_test"],
            "pairs_across": near_across,
            "groups_within_train": sum(1 for members in joined if scope(members) == "within_train"),
        },
        "leaked_test_images": {
            "exact": len(exact_leaks),
            "near_only": len(near_leaks),
            "total": len(exact_leaks | near_leaks),
            "paths": sorted(exact_leaks | near_leaks),
        },
        "label_conflicts": conflicts,
    }


def format_report(report: dict) -> str:
    """Render the report as the text the command prints."""
    lines = [f"train: {report['train_dir']}"]
    if report["test_dir"]:
        lines.append(f"test:  {report['test_dir']}")
    lines += [""] + _count_table(report) + [""]

    for split, summary in report["splits"].items():
        sizes = ", ".join(f"{size} ({count})" for size, count in list(summary["sizes"].items())[:SCREEN_EXAMPLES])
        more = len(summary["sizes"]) - SCREEN_EXAMPLES
        lines.append(f"{split} image sizes: {sizes or 'none'}" + (f", and {more} more sizes" if more > 0 else ""))
        modes = ", ".join(f"{mode} ({count})" for mode, count in summary["modes"].items())
        lines.append(f"{split} stored modes: {modes or 'none'}")
    lines.append("")

    lines.append(f"skipped files: {len(report['skipped'])}")
    lines += [f"  {item['split']} {item['path']} [{item['stage']}]: {item['reason']}"
              for item in report["skipped"]]
    lines.append(f"ignored files and folders: {len(report['ignored'])}")
    lines += _examples([f"{item['split']} {item['path']}: {item['reason']}" for item in report["ignored"]])
    lines.append(f"warnings: {len(report['warnings'])}")
    lines += _examples([f"{item['split']} {item['path']}: {item['warning']}" for item in report["warnings"]])
    lines.append("")

    exact = report["exact_duplicates"]
    lines.append(f"exact duplicates (byte-identical files): {exact['groups']} groups of {exact['files']} files; "
                 f"{exact['within_train']} within train, {exact['within_test']} within test, "
                 f"{exact['across']} across train and test")
    near, rule = report["near_duplicates"], report["near_duplicate_rule"]
    lines.append(f"near duplicates (pHash distance <= {rule['max_hamming_distance']} of 64 bits and thumbnail "
                 f"correlation >= {rule['min_thumbnail_correlation']}), not byte-identical: "
                 f"{near['pairs_within_train']} pairs within train, {near['pairs_within_test']} within test, "
                 f"{len(near['pairs_across'])} across")
    lines += _examples([f"test {pair['test']} ~ train {pair['train']} (distance {pair['hamming']}, "
                        f"correlation {pair['correlation']:.3f})" for pair in near["pairs_across"]])
    lines.append(f"duplicate groups within train (exact and near, kept on one side of the validation split; "
                 f"a group that also holds a test image counts as across, so training's own count of "
                 f"groups can be higher): {near['groups_within_train']}")
    if "test" in report["splits"]:
        leaks = report["leaked_test_images"]
        lines.append(f"test images with a duplicate in train: {leaks['total']} of "
                     f"{report['splits']['test']['images']} ({leaks['exact']} exact, {leaks['near_only']} near only); "
                     f"train with --exclude-duplicates-of TEST_DIR to leave their copies out")
    conflicts = report["label_conflicts"]
    lines.append(f"label conflicts (duplicate groups spanning classes): {len(conflicts)}")
    for conflict in conflicts[:SCREEN_EXAMPLES]:
        members = ", ".join(f"{m['split']} {m['path']} [{m['class']}]" for m in conflict["members"])
        lines.append(f"  {conflict['match']}: {members}")
    if len(conflicts) > SCREEN_EXAMPLES:
        lines.append(f"  ... and {len(conflicts) - SCREEN_EXAMPLES} more (all in --json)")
    lines.append("")

    if report["problems"]:
        lines.append("FAILED: problems that stop training:")
        lines += [f"  {problem}" for problem in report["problems"]]
    else:
        lines.append("OK: nothing here stops training")
    lines.append(f"checked in {report['seconds']:.1f} s")
    return "\n".join(lines)


def _count_table(report: dict) -> list[str]:
    names = report["class_names"]
    width = max(len(name) for name in names + ["total"]) + 2
    lines = ["images".ljust(8) + "".join(name.rjust(width) for name in names) + "total".rjust(width)]
    for split, summary in report["splits"].items():
        counts = [summary["per_class"].get(name, 0) for name in names]
        lines.append(split.ljust(8) + "".join(str(c).rjust(width) for c in counts)
                     + str(summary["images"]).rjust(width))
    return lines


def _examples(items: list[str]) -> list[str]:
    lines = [f"  {item}" for item in items[:SCREEN_EXAMPLES]]
    if len(items) > SCREEN_EXAMPLES:
        lines.append(f"  ... and {len(items) - SCREEN_EXAMPLES} more (all in --json)")
    return lines


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report as strict JSON, atomically (see runs.write_json)."""
    from hvdmri import runs

    runs.write_json(path, report)
