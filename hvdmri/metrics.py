"""Classification metrics from labels and class probabilities, computed with scikit-learn.

Undefined values (a class with no images, a ratio with a zero denominator) are
reported as NaN, never as a silent 0. JSON has no NaN, so runs.write_json()
writes them as null.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn import metrics as skm

# The class whose probability the tumor-vs-no-tumor screening view is built on.
NO_TUMOR_CLASS = "notumor"
# Equal-width confidence bins for top-label calibration when the caller passes no n_bins.
DEFAULT_CALIBRATION_BINS = 10


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray,
                           class_names: tuple[str, ...] | list[str]) -> dict:
    """Compute accuracy, per-class and averaged precision/recall/F1, ROC AUC, kappa and the confusion matrix.

    The headline figures are also named plainly: glioma_recall (missed gliomas are
    the costliest error) and notumor_precision (a wrong "no tumor" is false
    reassurance), when those classes exist.

    The macro and weighted averages run over the classes that occur in y_true or in
    the predictions (scikit-learn's default labels), and a ratio undefined for such a
    class counts as 0: a class with images that the model never predicts lowers the
    macro precision instead of dropping out of it. A class with neither images nor
    predictions is left out. Per class, undefined values stay NaN.

    ROC AUC is one-vs-rest per class (per_class[name]["roc_auc"]); roc_auc_macro is
    their mean and is NaN when any class has no images, because its AUC is undefined.
    """
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_pred = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
    labels = list(range(len(class_names)))
    result: dict = {"support": int(len(y_true))}
    if len(y_true) == 0:
        return result

    with warnings.catch_warnings():
        # A class absent from y_true or y_pred makes a ratio undefined; that shows as NaN.
        warnings.simplefilter("ignore")
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=np.nan)
        result["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
        result["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, y_pred))
        for average in ("macro", "weighted"):
            p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0.0)
            result[f"{average}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
        result["cohen_kappa"] = float(skm.cohen_kappa_score(y_true, y_pred, labels=labels))

    roc_auc = one_vs_rest_roc_auc(y_true, probabilities, len(class_names))
    result["roc_auc_macro"] = float(np.mean(roc_auc))
    result["per_class"] = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i]), "roc_auc": roc_auc[i]}
        for i, name in enumerate(class_names)
    }
    if "glioma" in class_names:
        result["glioma_recall"] = result["per_class"]["glioma"]["recall"]
    if NO_TUMOR_CLASS in class_names:
        result["notumor_precision"] = result["per_class"][NO_TUMOR_CLASS]["precision"]
    result["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return result


def format_metric(value, digits: int = 4) -> str:
    """Format a metric with fixed digits, or as n/a where it is undefined (NaN) or absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def headline(metrics: dict) -> str:
    """Format accuracy, balanced accuracy, glioma recall and no-tumor precision as one log line."""
    figures = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"),
               ("glioma recall", "glioma_recall"), ("no-tumor precision", "notumor_precision"))
    return ", ".join(f"{label} {format_metric(metrics.get(key))}" for label, key in figures)


def one_vs_rest_roc_auc(y_true: np.ndarray, probabilities: np.ndarray, n_classes: int) -> list[float]:
    """Return each class's ROC AUC against all others, NaN where the class is absent or alone."""
    y_true = np.asarray(y_true, dtype=int)
    values = []
    for k in range(n_classes):
        positive = y_true == k
        values.append(_binary_roc_auc(positive, np.asarray(probabilities)[:, k]))
    return values


def _binary_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    # Checked here because scikit-learn versions differ on a single class in y_true:
    # older ones raise ValueError, newer ones warn and return NaN.
    if positive.all() or not positive.any():
        return math.nan
    return float(skm.roc_auc_score(positive, scores))


def screening_metrics(y_true: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...] | list[str],
                      threshold: float = 0.5) -> dict:
    """Collapse the classes into tumor vs no tumor, scored by P(tumor) = 1 - P(notumor).

    An image counts as screened positive when P(tumor) >= threshold; ties go to
    "tumor" because a missed tumor costs more than a second look. This operating
    point can differ from the 4-class argmax (an image with probabilities
    0.3/0.2/0.4/0.1 is argmax "notumor" but P(tumor) = 0.6), so sensitivity and
    specificity here need not match the confusion matrix collapsed to two rows.

    Returns an empty dict when the model has no notumor class.
    """
    class_names = list(class_names)
    if NO_TUMOR_CLASS not in class_names:
        return {}
    no_tumor = class_names.index(NO_TUMOR_CLASS)
    y_true = np.asarray(y_true, dtype=int)
    p_tumor = 1.0 - np.asarray(probabilities, dtype=np.float64)[:, no_tumor]
    is_tumor = y_true != no_tumor
    screened_tumor = p_tumor >= threshold
    tn, fp, fn, tp = skm.confusion_matrix(is_tumor, screened_tumor, labels=[False, True]).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sensitivity = skm.recall_score(is_tumor, screened_tumor, pos_label=True, zero_division=np.nan)
        specificity = skm.recall_score(is_tumor, screened_tumor, pos_label=False, zero_division=np.nan)
    return {
        "score": f"P(tumor) = 1 - P({NO_TUMOR_CLASS})",
        "threshold": float(threshold),
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "roc_auc": _binary_roc_auc(is_tumor, p_tumor),
        "true_positives": int(tp),
        "false_negatives": int(fn),
        "true_negatives": int(tn),
        "false_positives": int(fp),
    }


def calibration_metrics(y_true: np.ndarray, probabilities: np.ndarray,
                        n_bins: int = DEFAULT_CALIBRATION_BINS) -> dict:
    """Compute the top-label expected calibration error (ECE) and its reliability bins.

    Each image's confidence is its highest class probability, and it is correct
    when that class is the true one. Confidences fall into n_bins equal-width bins
    [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1], the last one closed. Then
        ECE = sum over bins of (images in bin / all images) * |accuracy in bin - mean confidence in bin|.
    scikit-learn has no ECE, and its calibration_curve is binary and omits bin
    sizes, so the binning is done here with NumPy. Empty bins carry NaN accuracy
    and confidence and weigh nothing.
    """
    if n_bins < 1:
        raise ValueError(f"calibration needs at least 1 bin, got {n_bins}")
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    result: dict = {"n_bins": int(n_bins), "binning": "equal-width on top-label confidence",
                    "ece": math.nan, "bins": []}
    if len(y_true) == 0:
        return result

    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    bin_index = np.clip(np.floor(confidence * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        members = bin_index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else math.nan
        mean_confidence = float(confidence[members].mean()) if count else math.nan
        if count:
            ece += count / len(y_true) * abs(accuracy - mean_confidence)
        result["bins"].append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                               "accuracy": accuracy, "confidence": mean_confidence})
    result["ece"] = float(ece)
    return result
