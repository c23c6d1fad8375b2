"""Evaluate a trained run on a labelled test folder, data-parallel with Horovod.

    python -m hvdmri.evaluate --model runs/resnet50 --data Testing
    horovodrun --gloo -np 2 -H localhost:2 python -m hvdmri.evaluate --model runs/resnet50 --data Testing

Rank 0 lists the test folder and hands the listing to every rank. Each rank
predicts every world_size-th image. The probabilities are gathered by the image's
position in the listing before any metric is computed, so each image counts
exactly once whatever the number of ranks. Rank 0 writes the results.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from hvdmri.cli import add_model_argument, command_parser, positive_int, probability, run_command
from hvdmri.distributed import UsageError, Workers, get_logger, run_on_chief, setup_horovod
from hvdmri.metrics import DEFAULT_CALIBRATION_BINS

EVALUATION_DIR = "evaluation"

EXAMPLES = """example:
  python -m hvdmri.evaluate --model runs/resnet50 --data Testing

  # 2 workers on one node; every image is still counted once:
  horovodrun --gloo -np 2 -H localhost:2 python -m hvdmri.evaluate --model runs/resnet50 --data Testing

output (in --out, default RUN_DIR/evaluation/<name of the test folder>/):
  metrics.json               accuracy, balanced accuracy, per-class precision/recall/F1/support/ROC AUC,
                             macro and weighted averages, Cohen's kappa, glioma_recall, notumor_precision,
                             tumor-vs-no-tumor screening, calibration (ECE), unreadable files; NaN is null
  predictions.csv            path, true class, predicted class, each class probability
  confusion_matrix.csv/.png  rows: true class, columns: predicted class
  roc_curves.png             one-vs-rest per class, and tumor vs no tumor
  reliability_diagram.png    accuracy against confidence per calibration bin
  report.md                  the tables and the plots

Files that cannot be decoded are skipped, listed in metrics.json and report.md,
and do not change the exit code. Exit codes: 0 done, 2 bad input (message on stderr).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m hvdmri.evaluate",
                            "Evaluate a trained hvdmri model on a test folder laid out as DIR/<class>/<image>.",
                            EXAMPLES)
    add_model_argument(parser)
    parser.add_argument("--data", required=True, metavar="TEST_DIR",
                        help="test folder with one subfolder per class. A class may be missing, but "
                             "a folder of a class the model does not know is an error")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default RUN_DIR/evaluation/<name of TEST_DIR>)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per worker per batch (default 32)")
    parser.add_argument("--calibration-bins", type=positive_int, default=DEFAULT_CALIBRATION_BINS,
                        help=f"equal-width confidence bins for the calibration error and the reliability "
                             f"diagram (default {DEFAULT_CALIBRATION_BINS})")
    parser.add_argument("--screening-threshold", type=probability, default=0.5,
                        help="P(tumor) = 1 - P(notumor) at or above which the tumor-vs-no-tumor view "
                             "counts an image as tumor, for its sensitivity and specificity (default 0.5)")
    parser.add_argument("--gradcam", metavar="DIR",
                        help="also write a Grad-CAM overlay PNG per image into DIR, mirroring the class "
                             "folders; each worker writes the images of its own shard")
    parser.add_argument("--exclude-duplicates-of", metavar="TRAIN_DIR",
                        help="evaluate only the test images with no exact or near duplicate in TRAIN_DIR "
                             "(the folder the model was trained on); the number set aside is reported")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="intra-op threads per worker (default: the node's cores divided by its workers)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("hvdmri.evaluate", lambda: evaluate(args))


def default_out_dir(run_dir: Path, data_root: Path) -> Path:
    return run_dir / EVALUATION_DIR / (data_root.name or "data")


def evaluate(args: argparse.Namespace) -> Path:
    """Evaluate on every rank, with rank 0 writing the files. Return the output folder."""
    workers = setup_horovod(args.threads)
    log = get_logger()

    from hvdmri.inference import gather_by_index

    run_dir = Path(args.model).resolve()
    data_root = Path(args.data).resolve()
    out_dir = Path(args.out).resolve() if args.out else default_out_dir(run_dir, data_root)

    model, class_names, image_size = load_model_on_every_rank(workers, run_dir)
    listing, set_aside = run_on_chief(
        workers, lambda: list_test_images(data_root, class_names, args.exclude_duplicates_of), "list_test_images")
    if args.exclude_duplicates_of:
        log.info("--exclude-duplicates-of %s: set aside %d test images that duplicate a training image",
                 args.exclude_duplicates_of, len(set_aside))
    log.info("model: %s (%d px, classes %s)", run_dir, image_size, ", ".join(class_names))
    log.info("data: %s, %d images (%s), %d skipped at listing", data_root, len(listing),
             ", ".join(f"{name} {count}" for name, count in listing.counts().items()), len(listing.skipped))

    ids, probabilities = predict_listing(workers, model, listing, image_size, args.batch_size)
    ids, probabilities = gather_by_index(ids, probabilities, workers.world_size)

    if workers.is_chief:
        unreadable = sorted(list(listing.skipped) + find_decode_failures(listing, ids))
        for relative, reason in unreadable:
            log.warning("skipped %s: %s", relative, reason)
        if len(ids) == 0:
            raise UsageError(f"none of the {len(listing) + len(listing.skipped)} image files in {data_root} "
                             f"could be decoded; nothing to evaluate")
        check_finite(listing, ids, probabilities, run_dir)
        write_results(out_dir, run_dir, data_root, listing, ids, probabilities, unreadable,
                      workers.world_size, args.calibration_bins, args.screening_threshold,
                      set_aside if args.exclude_duplicates_of else None)

    if args.gradcam:
        write_gradcam(workers, model, listing, image_size, args.batch_size, Path(args.gradcam).resolve())
    return out_dir


def load_model_on_every_rank(workers: Workers, run_dir: Path):
    """Load the run's model on every rank, or raise the same UsageError on all of them.

    Every rank loads its own copy. The outcome is gathered before anything else,
    so a node that cannot read the run folder does not leave the others waiting
    in the next collective.
    """
    from hvdmri import runs

    problem, loaded = None, None
    try:
        loaded = runs.load_trained_model(run_dir)
    except FileNotFoundError as error:
        problem = str(error)
    except (OSError, ValueError, KeyError) as error:
        # A truncated or foreign model.keras or classes.json ends up here.
        problem = f"{run_dir}: cannot load the trained model ({type(error).__name__}: {error})"
    if loaded is not None:
        model, class_names, _ = loaded
        outputs = int(model.output_shape[-1])
        if outputs != len(class_names):
            problem = (f"{run_dir}: model.keras has {outputs} outputs but classes.json names "
                       f"{len(class_names)} classes; the run folder is inconsistent")
    if workers.world_size > 1:
        import horovod.tensorflow as hvd

        reports = hvd.allgather_object((workers.rank, socket.gethostname(), problem), name="load_model")
    else:
        reports = [(workers.rank, socket.gethostname(), problem)]
    failed = [(rank, host, text) for rank, host, text in reports if text]
    if failed:
        rank, host, text = failed[0]
        where = f" (rank {rank} on {host})" if workers.world_size > 1 else ""
        raise UsageError(f"{text}{where}")
    return loaded


def predict_listing(workers: Workers, model, listing, image_size: int, batch_size: int):
    """Predict this rank's shard of the listing; return (global ids, probabilities) of the decoded images."""
    import numpy as np
    from tqdm import tqdm

    from hvdmri.data.pipeline import make_dataset
    from hvdmri.data.split import shard
    from hvdmri.inference import predict_shard

    shard_ids = shard(np.arange(len(listing)), workers.rank, workers.world_size)
    dataset = make_dataset([listing.absolute(listing.paths[i]) for i in shard_ids],
                           [listing.labels[i] for i in shard_ids], image_size, batch_size,
                           training=False, with_index=True)
    # The bar counts rank 0's images; the other shards are at most one image longer
    # or shorter. It stops short of its total by the files that failed to decode.
    with tqdm(total=len(shard_ids), unit="image", desc="evaluate", disable=not workers.is_chief) as bar:
        positions, probabilities = predict_shard(model, _counting(dataset, bar))
    return shard_ids[positions], probabilities


def _counting(dataset, bar):
    for batch in dataset:
        bar.update(int(batch[0].shape[0]))
        yield batch


def find_decode_failures(listing, ids) -> list[tuple[str, str]]:
    """Return (relative path, reason) for listed images the input pipeline dropped.

    The pipeline drops undecodable files without saying why; decoding them once
    more here recovers the reason.
    """
    from hvdmri.data.decode import DecodeError, decode_image

    decoded = set(int(i) for i in ids)
    failures = []
    for i, relative in enumerate(listing.paths):
        if i in decoded:
            continue
        path = listing.absolute(relative)
        try:
            decode_image(path)
            reason = "dropped by the input pipeline although it decodes on a second read"
        except DecodeError as error:
            reason = str(error).removeprefix(f"{path}: ")
        failures.append((relative, reason))
    return failures


def check_finite(listing, ids, probabilities, run_dir: Path) -> None:
    """Raise UsageError when the model returned NaN or infinite probabilities, as a diverged model does."""
    import numpy as np

    broken = ~np.isfinite(probabilities).all(axis=1)
    if broken.any():
        first = listing.paths[int(ids[np.argmax(broken)])]
        raise UsageError(f"{run_dir / 'model.keras'} returned NaN or infinite probabilities for "
                         f"{int(broken.sum())} of {len(ids)} images (first: {first}); its weights are "
                         f"unusable, so evaluate another run")


def list_test_images(data_root: Path, class_names, exclude_duplicates_of: str | None):
    """Rank 0: list the test folder; return (listing, test paths set aside as duplicates of training)."""
    from hvdmri.data.duplicates import leak_free_test_paths
    from hvdmri.data.listing import list_images

    listing = list_images(data_root, class_names=class_names, require_all=False)
    if not exclude_duplicates_of:
        return listing, []
    train_dir = Path(exclude_duplicates_of)
    if not train_dir.is_dir():
        raise UsageError(f"--exclude-duplicates-of: folder not found: {train_dir}")
    kept = set(leak_free_test_paths(listing, train_dir))
    set_aside = [path for path in listing.paths if path not in kept]
    positions = [i for i, path in enumerate(listing.paths) if path in kept]
    listing.paths = [listing.paths[i] for i in positions]
    listing.labels = [listing.labels[i] for i in positions]
    return listing, set_aside


def write_results(out_dir: Path, run_dir: Path, data_root: Path, listing, ids, probabilities,
                  unreadable: list[tuple[str, str]], world_size: int, calibration_bins: int,
                  screening_threshold: float = 0.5, set_aside: list[str] | None = None) -> None:
    """Compute every metric on the gathered predictions and write the evaluation files."""
    import numpy as np

    from hvdmri.metrics import calibration_metrics, classification_metrics, format_metric, headline, screening_metrics
    from hvdmri.report import write_evaluation

    log = get_logger()
    class_names = listing.class_names
    y_true = np.asarray(listing.labels, dtype=int)[ids]
    metrics = {
        "model": str(run_dir),
        "data": str(data_root),
        "class_names": list(class_names),
        "world_size": world_size,
        "images_found": len(listing) + len(listing.skipped),
        "images_evaluated": int(len(ids)),
        "images_unreadable": len(unreadable),
        "unreadable_images": [{"path": relative, "reason": reason} for relative, reason in unreadable],
    }
    if set_aside is not None:
        # Test images whose copies the model trained on; they would inflate every figure.
        metrics["duplicates_of_training_set_aside"] = len(set_aside)
        metrics["duplicates_of_training"] = set_aside
    metrics.update(classification_metrics(y_true, probabilities, class_names))
    metrics["screening"] = screening_metrics(y_true, probabilities, class_names, screening_threshold)
    metrics["calibration"] = calibration_metrics(y_true, probabilities, calibration_bins)
    try:
        report = write_evaluation(out_dir, metrics, [listing.paths[i] for i in ids], y_true, probabilities)
    except OSError as error:
        raise UsageError(f"writing the evaluation into {out_dir} failed ({error}); "
                         f"choose a writable folder with --out") from None

    log.info("%s, ECE %s (%d images, %d unreadable)", headline(metrics),
             format_metric(metrics["calibration"]["ece"]), metrics["images_evaluated"], metrics["images_unreadable"])
    log.info("report: %s", report)


def write_gradcam(workers: Workers, model, listing, image_size: int, batch_size: int, out_dir: Path) -> None:
    """Write Grad-CAM overlays for this rank's shard into out_dir/<class>/<image>_gradcam.png."""
    import numpy as np
    from tqdm import tqdm

    from hvdmri.data.split import shard
    from hvdmri.gradcam import GradCam, explain_files, overlay_names

    # NOTE: each rank writes its own shard's overlays, so on nodes without a shared
    # folder the overlays end up spread over the nodes' local copies of DIR.
    names = overlay_names(listing.paths)
    shard_ids = shard(np.arange(len(listing)), workers.rank, workers.world_size)
    try:
        gradcam = GradCam(model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    with tqdm(total=len(shard_ids), unit="image", desc="grad-cam", disable=not workers.is_chief) as bar:
        try:
            explain_files(gradcam, [listing.absolute(listing.paths[i]) for i in shard_ids],
                          [out_dir / names[i] for i in shard_ids], image_size, batch_size, progress=bar.update)
        except OSError as error:
            raise UsageError(f"writing Grad-CAM overlays into {out_dir} failed ({error}); "
                             f"choose a writable folder with --gradcam") from None
    get_logger().info("Grad-CAM overlays: %s", out_dir)


if __name__ == "__main__":
    sys.exit(main())
