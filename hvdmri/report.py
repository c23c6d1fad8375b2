"""The files an evaluation writes: metrics JSON, CSV tables, PNG plots and a Markdown report.

Plots are drawn on matplotlib Figure objects, which render PNG through the Agg
canvas whatever backend pyplot would pick, so nodes without a display work.
Every file is written atomically through runs.atomic_path.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from hvdmri import runs
from hvdmri.metrics import NO_TUMOR_CLASS, format_metric

METRICS_JSON = "metrics.json"
PREDICTIONS_CSV = "predictions.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc_curves.png"
RELIABILITY_PNG = "reliability_diagram.png"
REPORT_MD = "report.md"


def probability_columns(class_names) -> list[str]:
    return [f"p_{name}" for name in class_names]


def write_metrics_json(path: str | os.PathLike, metrics: dict) -> None:
    """Write metrics with NaN as null, so strict JSON parsers read the file."""
    runs.write_json(path, metrics)


def write_predictions_csv(path: str | os.PathLike, paths: list[str], y_true: np.ndarray,
                          probabilities: np.ndarray, class_names) -> None:
    """Write one row per image: path, true class, predicted class, each class probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "true_class", "predicted_class", *probability_columns(class_names)])
    for relative, label, row in zip(paths, y_true, probabilities):
        writer.writerow([relative, class_names[int(label)], class_names[int(np.argmax(row))],
                         *(f"{value:.6f}" for value in row)])
    runs.write_text(path, buffer.getvalue())


def write_confusion_csv(path: str | os.PathLike, matrix, class_names) -> None:
    """Write the confusion matrix with true classes as rows and predicted classes as columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, matrix):
        writer.writerow([name, *(int(value) for value in row)])
    runs.write_text(path, buffer.getvalue())


def _save(figure: Figure, path: str | os.PathLike) -> None:
    with runs.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")


def plot_confusion_matrix(path: str | os.PathLike, matrix, class_names) -> None:
    figure = Figure(figsize=(5.5, 4.5))
    axes = figure.subplots()
    display = skm.ConfusionMatrixDisplay(confusion_matrix=np.asarray(matrix), display_labels=list(class_names))
    display.plot(ax=axes, cmap="Blues", colorbar=True, values_format="d")
    axes.set_title("Confusion matrix (rows: true class)")
    _save(figure, path)


def plot_roc_curves(path: str | os.PathLike, y_true: np.ndarray, probabilities: np.ndarray, class_names) -> None:
    """Plot one-vs-rest ROC curves per class and the tumor-vs-no-tumor curve.

    A class with no images, or with every image, has no ROC curve and is left out
    of the plot with a note in the legend.
    """
    figure = Figure(figsize=(10, 4.5))
    per_class, screening = figure.subplots(1, 2)
    y_true = np.asarray(y_true, dtype=int)
    for k, name in enumerate(class_names):
        positive = y_true == k
        if positive.all() or not positive.any():
            per_class.plot([], [], label=f"{name} (undefined: {int(positive.sum())} images)")
            continue
        fpr, tpr, _ = skm.roc_curve(positive, probabilities[:, k])
        auc = skm.roc_auc_score(positive, probabilities[:, k])
        per_class.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    _finish_roc_axes(per_class, "One vs rest per class")

    class_names = list(class_names)
    if NO_TUMOR_CLASS in class_names:
        no_tumor = class_names.index(NO_TUMOR_CLASS)
        is_tumor = y_true != no_tumor
        p_tumor = 1.0 - probabilities[:, no_tumor]
        if is_tumor.all() or not is_tumor.any():
            screening.plot([], [], label="undefined: only one of tumor / no tumor present")
        else:
            fpr, tpr, _ = skm.roc_curve(is_tumor, p_tumor)
            auc = skm.roc_auc_score(is_tumor, p_tumor)
            screening.plot(fpr, tpr, color="crimson", label=f"P(tumor) (AUC {auc:.3f})")
        _finish_roc_axes(screening, f"Tumor vs no tumor, P(tumor) = 1 - P({NO_TUMOR_CLASS})")
    else:
        screening.set_visible(False)
    _save(figure, path)


def _finish_roc_axes(axes, title: str) -> None:
    axes.plot([0, 1], [0, 1], linestyle=":", color="gray", label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("False positive rate (1 - specificity)")
    axes.set_ylabel("True positive rate (sensitivity)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")


def plot_reliability_diagram(path: str | os.PathLike, calibration: dict) -> None:
    """Plot accuracy against mean confidence per bin, with bin sizes below."""
    bins = calibration["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    accuracy = np.array([b["accuracy"] for b in bins], dtype=float)
    confidence = np.array([b["confidence"] for b in bins], dtype=float)
    counts = np.array([b["count"] for b in bins])
    filled = counts > 0

    figure = Figure(figsize=(5, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lower[filled], accuracy[filled], width=width[filled], align="edge",
            edgecolor="black", color="steelblue", label="accuracy in bin")
    top.bar(lower[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled],
            width=width[filled], align="edge", color="salmon", alpha=0.5, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], linestyle=":", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("Accuracy")
    top.set_title(f"Reliability diagram (ECE {_format(calibration['ece'])}, {calibration['n_bins']} bins)")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(lower, counts, width=width, align="edge", edgecolor="black", color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("Confidence (highest class probability)")
    bottom.set_ylabel("Images")
    _save(figure, path)


def _format(value) -> str:
    return format_metric(value) if value is None or isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_format(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown_report(metrics: dict) -> str:
    """Render the evaluation as Markdown, linking the plots by file name relative to the report."""
    class_names = metrics["class_names"]
    lines = [
        f"# Evaluation of {Path(metrics['model']).name} on {Path(metrics['data']).name}",
        "",
        f"- model: `{metrics['model']}`",
        f"- test data: `{metrics['data']}`",
        f"- images evaluated: {metrics['images_evaluated']} of {metrics['images_found']} found; "
        f"{metrics['images_unreadable']} unreadable (listed at the end)",
        f"- workers: {metrics['world_size']}",
    ]
    if "duplicates_of_training_set_aside" in metrics:
        lines.append(f"- set aside: {metrics['duplicates_of_training_set_aside']} test images that duplicate "
                     f"a training image (exactly or nearly); the figures below exclude them")
    lines += [
        "",
        "## Headline",
        "",
    ]
    calibration = metrics["calibration"]
    lines += _table(["metric", "value"], [
        ["accuracy", metrics.get("accuracy")],
        ["balanced accuracy", metrics.get("balanced_accuracy")],
        ["glioma recall", metrics.get("glioma_recall")],
        ["no-tumor precision", metrics.get("notumor_precision")],
        ["Cohen's kappa", metrics.get("cohen_kappa")],
        ["ROC AUC (macro, one vs rest)", metrics.get("roc_auc_macro")],
        ["expected calibration error", calibration.get("ece")],
    ])

    lines += ["", "## Per class", ""]
    rows = []
    for name in class_names:
        scores = metrics["per_class"][name]
        rows.append([name, scores["precision"], scores["recall"], scores["f1"], scores["roc_auc"], scores["support"]])
    for average in ("macro", "weighted"):
        scores = metrics[f"{average}_avg"]
        rows.append([f"{average} average", scores["precision"], scores["recall"], scores["f1"], "", metrics["support"]])
    lines += _table(["class", "precision", "recall", "F1", "ROC AUC (one vs rest)", "support"], rows)

    lines += ["", "## Confusion matrix", "", "Rows are the true class, columns the predicted class.", ""]
    lines += _table(["true \\ predicted", *class_names],
                    [[name, *row] for name, row in zip(class_names, metrics["confusion_matrix"])])
    lines += ["", f"![confusion matrix]({CONFUSION_PNG})", ""]

    screening = metrics.get("screening") or {}
    if screening:
        lines += ["## Tumor vs no tumor screening", "",
                  f"Scored by {screening['score']}; an image is screened positive when "
                  f"P(tumor) >= {screening['threshold']:g}. This can differ from the 4-class decision.", ""]
        lines += _table(["metric", "value"], [
            ["sensitivity", screening["sensitivity"]],
            ["specificity", screening["specificity"]],
            ["ROC AUC", screening["roc_auc"]],
            ["true positives / false negatives", f"{screening['true_positives']} / {screening['false_negatives']}"],
            ["true negatives / false positives", f"{screening['true_negatives']} / {screening['false_positives']}"],
        ])
        lines.append("")

    lines += ["## ROC curves", "", f"![ROC curves]({ROC_PNG})", "",
              "## Calibration", "",
              f"Expected calibration error {_format(calibration['ece'])}: the top-label confidence "
              f"(highest class probability) in {calibration['n_bins']} equal-width bins over [0, 1], "
              f"each bin's |accuracy - mean confidence| weighted by its share of the images.", "",
              f"![reliability diagram]({RELIABILITY_PNG})", "",
              "## Unreadable images", ""]
    unreadable = metrics["unreadable_images"]
    if unreadable:
        lines += [f"{len(unreadable)} file(s) were skipped and are not in any figure above:", ""]
        lines += [f"- `{item['path']}`: {item['reason']}" for item in unreadable]
    else:
        lines.append("None.")
    lines += ["", "## Files", "",
              f"- [{METRICS_JSON}]({METRICS_JSON}): every figure above (NaN written as null)",
              f"- [{PREDICTIONS_CSV}]({PREDICTIONS_CSV}): one row per evaluated image",
              f"- [{CONFUSION_CSV}]({CONFUSION_CSV})", ""]
    return "\n".join(lines)


def write_evaluation(out_dir: str | os.PathLike, metrics: dict, paths: list[str], y_true: np.ndarray,
                     probabilities: np.ndarray) -> Path:
    """Write every evaluation file into out_dir; return the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = metrics["class_names"]
    write_metrics_json(out_dir / METRICS_JSON, metrics)
    write_predictions_csv(out_dir / PREDICTIONS_CSV, paths, y_true, probabilities, class_names)
    write_confusion_csv(out_dir / CONFUSION_CSV, metrics["confusion_matrix"], class_names)
    plot_confusion_matrix(out_dir / CONFUSION_PNG, metrics["confusion_matrix"], class_names)
    plot_roc_curves(out_dir / ROC_PNG, y_true, probabilities, class_names)
    plot_reliability_diagram(out_dir / RELIABILITY_PNG, metrics["calibration"])
    runs.write_text(out_dir / REPORT_MD, markdown_report(metrics))
    return out_dir / REPORT_MD
