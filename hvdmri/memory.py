"""Peak resident memory of one training worker, from a model fitted to measurements.

peak RSS (GiB) = a + b * batch_size * (image_size / 224)^2, one (a, b) per precision:
a is the fixed part (Python, TensorFlow, Horovod, weights, gradients and Adam state),
b the activations kept for the backward pass per 224 px image. Standard library only,
because hvdmri.preflight imports it before TensorFlow is needed.
"""

from __future__ import annotations

import math

from hvdmri.distributed import UsageError

REFERENCE_SIZE = 224

# (a GiB, b GiB per 224 px image) from `python -m hvdmri.memory docs/results/*.jsonl`. That
# fit covers the peak RSS of one worker training the whole network at 224 px, batch 8 to 64,
# in 55 benchmark runs on a 2-core Intel VM with AVX512_BF16 and AMX (TensorFlow 2.15.1,
# Horovod 0.28.1). b is the least-squares slope. a is the least-squares intercept plus the
# largest residual, so the model lies at or above every measured run, by up to 1.04 GiB
# (float32) and 0.19 GiB (bfloat16). The float32 margin is large because the same float32
# run peaked 0.9 GiB higher in some runs than in others (batch 32: 4.0 or 4.9 GiB), and the
# bound covers the higher one.
# NOTE: measured with one worker on the machine, and docs/BENCHMARKS.md gives what a second
# worker adds. Other TensorFlow versions or CPUs can differ.
MEMORY_MODEL_GIB = {
    "float32": (2.159, 0.0878),
    "mixed_bfloat16": (1.483, 0.0435),
}


def estimate_worker_memory_gib(batch_size: int, image_size: int, precision: str = "auto") -> float:
    """Return the estimated peak RSS of one training worker in GiB.

    precision "auto" takes the larger of the two precisions, because the CPU that
    decides it may not be the one asking.
    """
    if precision == "auto":
        return max(estimate_worker_memory_gib(batch_size, image_size, name) for name in MEMORY_MODEL_GIB)
    if precision not in MEMORY_MODEL_GIB:
        raise ValueError(f"precision must be auto or one of {', '.join(MEMORY_MODEL_GIB)}, got {precision!r}")
    fixed, per_image = MEMORY_MODEL_GIB[precision]
    return fixed + per_image * batch_size * (image_size / REFERENCE_SIZE) ** 2


def largest_batch_size(budget_gib: float, image_size: int, precision: str = "auto") -> int:
    """Return the largest batch size whose estimate fits in budget_gib; 0 when none does."""
    fixed = estimate_worker_memory_gib(0, image_size, precision)
    per_image = estimate_worker_memory_gib(1, image_size, precision) - fixed
    if budget_gib < fixed + per_image:
        return 0
    # A small tolerance, so a budget that equals an estimate exactly is not lost to rounding.
    return int(math.floor((budget_gib - fixed) / per_image + 1e-9))


def check_memory_budget(budget_gib: float, batch_size: int, image_size: int, precision: str) -> None:
    """Reject, before training, a batch size whose estimated peak RSS exceeds the budget.

    Raises:
        UsageError: the estimate exceeds budget_gib; the message names the largest
            batch size that fits, or states that none fits at this image size.
    """
    needed = estimate_worker_memory_gib(batch_size, image_size, precision)
    if needed <= budget_gib:
        from hvdmri.distributed import get_logger

        get_logger().info("--memory-budget %g GiB: batch size %d at %d px in %s needs about %.1f GiB per "
                          "worker", budget_gib, batch_size, image_size, precision, needed)
        return
    largest = largest_batch_size(budget_gib, image_size, precision)
    what = (f"--memory-budget {budget_gib:g}: --batch-size {batch_size} at {image_size} px in {precision} "
            f"needs about {needed:.1f} GiB per worker")
    if largest:
        raise UsageError(f"{what}; the largest batch size that fits is {largest} (pass --batch-size {largest})")
    fixed = estimate_worker_memory_gib(0, image_size, precision)
    if fixed >= budget_gib:
        # The fixed part (framework, weights, optimizer state) does not shrink with the image size.
        raise UsageError(f"{what}, and the model alone needs about {fixed:.1f} GiB at any batch or image "
                         f"size; raise --memory-budget")
    raise UsageError(f"{what}, and even batch size 1 does not fit; lower --image-size or raise --memory-budget")


def fit_memory_model(points: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Fit a and b of the model by least squares to (batch_size, image_size, peak RSS GiB) points.

    Raises:
        ValueError: fewer than two distinct batch-size-times-area values.
    """
    xs = [batch * (size / REFERENCE_SIZE) ** 2 for batch, size, _ in points]
    ys = [rss for _, _, rss in points]
    if len(set(xs)) < 2:
        raise ValueError(f"fitting needs at least two different batch sizes or image sizes, got {points}")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def describe_fit(lines: list[dict]) -> str:
    """Fit the model per precision to benchmark JSON lines; return one printable line per precision."""
    points: dict[str, list[tuple[int, int, float]]] = {}
    for line in lines:
        if "error" not in line:
            rss = max(line["peak_rss_gib_per_worker"])
            points.setdefault(line["precision_used"], []).append((line["batch_size"], line["image_size"], rss))
    described = []
    for precision, found in sorted(points.items()):
        try:
            fixed, per_image = fit_memory_model(found)
        except ValueError as error:
            described.append(f"{precision}: {error}")
            continue
        residuals = [rss - fixed - per_image * batch * (size / REFERENCE_SIZE) ** 2 for batch, size, rss in found]
        described.append(f"{precision}: a = {fixed:.3f} GiB, b = {per_image:.4f} GiB per 224 px image "
                         f"({len(found)} runs, residuals {min(residuals):+.3f} to {max(residuals):+.3f} GiB; "
                         f"a + largest residual = {fixed + max(residuals):.3f} GiB bounds every run)")
    return "\n".join(described)


def measured_against_model(lines: list[dict]) -> str:
    """Format a Markdown table: measured peak RSS range per precision, batch and size, and the stored model."""
    peaks: dict[tuple[str, int, int], list[float]] = {}
    for line in lines:
        key = (line["precision_used"], line["batch_size"], line["image_size"])
        peaks.setdefault(key, []).append(max(line["peak_rss_gib_per_worker"]))
    rows = ["| precision | batch | image size | runs | measured peak RSS GiB | hvdmri/memory.py estimate GiB |",
            "| --- | --- | --- | --- | --- | --- |"]
    for (precision, batch, size), values in sorted(peaks.items()):
        estimate = (f"{estimate_worker_memory_gib(batch, size, precision):.2f}"
                    if precision in MEMORY_MODEL_GIB else "n/a")
        rows.append(f"| {precision} | {batch} | {size} | {len(values)} | {min(values):.2f}-{max(values):.2f} | "
                    f"{estimate} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Fit the model over saved benchmark results: python -m hvdmri.memory FILE.jsonl..."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hvdmri.memory",
        description="Fit peak RSS = a + b * batch * (size/224)^2 per precision over the single-worker "
                    "hvdmri runs in files written by python -m hvdmri.bench --out.")
    parser.add_argument("results", nargs="+", help="files of benchmark JSON lines")
    args = parser.parse_args(argv)
    from hvdmri.bench.results import read_results, single_worker_runs

    try:
        lines = read_results(args.results, ("name", "mode", "world_size", "precision_used", "batch_size",
                                            "image_size", "peak_rss_gib_per_worker"))
    except ValueError as error:
        parser.error(str(error))
    runs = single_worker_runs(lines)
    if not runs:
        parser.error("no successful single-worker hvdmri run in the files")
    print(describe_fit(runs))
    print(measured_against_model(runs))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
