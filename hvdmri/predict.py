"""Classify MRI images with a trained run: one row per image with every class probability.

    python -m hvdmri.predict --model runs/resnet50 scan.jpg
    python -m hvdmri.predict --model runs/resnet50 Testing/glioma --csv glioma.csv

Images go through the same decode, resize and ResNet-50 preprocessing as in
training, and the class names come from the run folder's classes.json.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hvdmri.distributed import UsageError
from hvdmri.cli import add_model_argument, command_parser, positive_int

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2

EXAMPLES = """example:
  python -m hvdmri.predict --model runs/resnet50 Testing/glioma --csv glioma.csv --gradcam gradcam/

Folders are searched recursively for .jpg, .jpeg and .png files (hidden files
and folders are left out). A file named directly is always tried, whatever its
extension.

exit codes:
  0  every input was predicted
  1  at least one input could not be read or decoded: each one is reported on
     stderr, the others are still predicted, printed and written to --json/--csv
  2  bad command line or run folder (for example no model.keras in RUN_DIR)
"""


@dataclass
class Predictions:
    """Predicted images in input order, and the inputs that failed with their reasons."""

    class_names: tuple[str, ...]
    paths: list[str] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def predicted(self, row: int) -> str:
        values = self.probabilities[row]
        return self.class_names[max(range(len(values)), key=values.__getitem__)]


def build_parser():
    parser = command_parser("python -m hvdmri.predict",
                            "Predict the tumor class of brain MRI images with a trained hvdmri model.", EXAMPLES)
    add_model_argument(parser)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--json", metavar="FILE", help="also write the predictions and failures as JSON")
    parser.add_argument("--csv", metavar="FILE",
                        help="also write one CSV row per input: path, predicted class, each class "
                             "probability, error (empty unless the input failed)")
    parser.add_argument("--gradcam", metavar="DIR",
                        help="also write a Grad-CAM overlay PNG per image (original beside the heat map "
                             "of the predicted class) into DIR")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="images per forward pass (default 16)")
    return parser


def collect_inputs(inputs: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Expand the command-line inputs into image files.

    Returns:
        (files, failed): files as (path, name relative to the Grad-CAM folder), and
        (input, reason) for inputs that are missing or folders without images.
    """
    from hvdmri.data.listing import IMAGE_EXTENSIONS, is_ignored

    files, failed = [], []
    for argument in inputs:
        path = Path(argument)
        if path.is_file():
            files.append((argument, path.name))
        elif path.is_dir():
            found = []
            for folder, subfolders, names in os.walk(path, followlinks=False):
                subfolders[:] = sorted(name for name in subfolders if not is_ignored(name))
                for name in sorted(names):
                    if not is_ignored(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                        found.append(os.path.join(folder, name))
            if not found:
                failed.append((argument, f"folder contains no {', '.join(IMAGE_EXTENSIONS)} files"))
            name = path.resolve().name or "root"
            files += [(file, os.path.join(name, os.path.relpath(file, path))) for file in found]
        elif path.exists():
            failed.append((argument, "not a regular file or folder"))
        else:
            failed.append((argument, "file or folder not found"))
    return files, failed


def predict_files(model, class_names: tuple[str, ...], image_size: int, paths: list[str],
                  batch_size: int = 16) -> Predictions:
    """Decode, preprocess and classify image files; unusable ones go to Predictions.failed.

    Each file passes the listing's header and size check first, as it would in
    evaluation, so both commands reject the same files with the same reason.
    """
    import numpy as np

    from hvdmri.data.decode import DecodeError, load_image, preprocess
    from hvdmri.data.listing import sniff_image

    result = Predictions(class_names=tuple(class_names))
    for start in range(0, len(paths), batch_size):
        images, decoded = [], []
        for path in paths[start:start + batch_size]:
            reason = sniff_image(Path(path))
            if reason:
                result.failed.append((path, reason))
                continue
            try:
                images.append(load_image(path, image_size))
            except DecodeError as error:
                result.failed.append((path, str(error).removeprefix(f"{path}: ")))
                continue
            decoded.append(path)
        if not images:
            continue
        probabilities = model(preprocess(np.stack(images)), training=False).numpy()
        result.paths += decoded
        result.probabilities += probabilities.astype(float).tolist()
    return result


def format_table(predictions: Predictions) -> str:
    """Render the predictions as an aligned text table."""
    header = ["path", "predicted", *predictions.class_names]
    rows = [[path, predictions.predicted(i), *(f"{p:.4f}" for p in predictions.probabilities[i])]
            for i, path in enumerate(predictions.paths)]
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) if column < 2 else str(cell).rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def write_json(path: str, run_dir: Path, predictions: Predictions) -> None:
    from hvdmri import runs

    runs.write_json(path, {
        "model": str(run_dir),
        "class_names": list(predictions.class_names),
        "predictions": [
            {"path": image, "predicted_class": predictions.predicted(i),
             "probabilities": dict(zip(predictions.class_names, predictions.probabilities[i]))}
            for i, image in enumerate(predictions.paths)
        ],
        "failed": [{"path": image, "error": reason} for image, reason in predictions.failed],
    })


def write_csv(path: str, predictions: Predictions) -> None:
    from hvdmri import runs
    from hvdmri.report import probability_columns

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted_class", *probability_columns(predictions.class_names), "error"])
    for i, image in enumerate(predictions.paths):
        writer.writerow([image, predictions.predicted(i), *(f"{p:.6f}" for p in predictions.probabilities[i]), ""])
    for image, reason in predictions.failed:
        writer.writerow([image, "", *([""] * len(predictions.class_names)), reason])
    runs.write_text(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict(args)
    except UsageError as error:
        print(f"hvdmri.predict: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def predict(args) -> int:
    """Run the command; return its exit code."""
    from hvdmri import runs

    check_outputs(args)
    run_dir = Path(args.model)
    try:
        model, class_names, image_size = runs.load_trained_model(run_dir)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"{run_dir}: cannot load the trained model ({type(error).__name__}: {error})") from None
    if int(model.output_shape[-1]) != len(class_names):
        raise UsageError(f"{run_dir}: model.keras has {model.output_shape[-1]} outputs but classes.json "
                         f"names {len(class_names)} classes; the run folder is inconsistent")

    files, failed = collect_inputs(args.inputs)
    predictions = predict_files(model, class_names, image_size, [path for path, _ in files], args.batch_size)
    predictions.failed = failed + predictions.failed

    if predictions.paths:
        print(format_table(predictions))
    for image, reason in predictions.failed:
        print(f"hvdmri.predict: error: {image}: {reason}", file=sys.stderr)

    try:
        if args.json:
            write_json(args.json, run_dir.resolve(), predictions)
        if args.csv:
            write_csv(args.csv, predictions)
        if args.gradcam and predictions.paths:
            write_gradcam(model, image_size, files, predictions, Path(args.gradcam), args.batch_size)
    except OSError as error:
        raise UsageError(f"writing the output failed: {error}") from None

    if predictions.failed:
        attempted = len(predictions.failed) + len(predictions.paths)
        print(f"hvdmri.predict: {len(predictions.failed)} of {attempted} inputs failed; "
              f"the others were predicted", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def check_outputs(args) -> None:
    """Fail before loading the model when an output named by a flag cannot be written."""
    for flag, value in (("--json", args.json), ("--csv", args.csv)):
        if not value:
            continue
        path = Path(value)
        if path.is_dir():
            raise UsageError(f"{flag} {value} is a folder; give a file name")
        if not path.parent.is_dir():
            raise UsageError(f"{flag} {value}: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise UsageError(f"{flag} {value}: folder {path.parent} is not writable")
    if args.gradcam:
        folder = Path(args.gradcam)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--gradcam {args.gradcam} is a file; give a folder for the heat maps")
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK):
            raise UsageError(f"--gradcam {args.gradcam}: {existing} is not writable")


def write_gradcam(model, image_size: int, files: list[tuple[str, str]], predictions: Predictions,
                  out_dir: Path, batch_size: int) -> None:
    """Write Grad-CAM overlays for the images that were predicted."""
    from hvdmri.gradcam import GradCam, explain_files, overlay_names

    relative_by_path = dict(files)
    predicted = predictions.paths
    names = overlay_names([relative_by_path[path] for path in predicted])
    try:
        gradcam = GradCam(model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    explain_files(gradcam, predicted, [out_dir / name for name in names], image_size, batch_size)
    print(f"Grad-CAM overlays: {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
