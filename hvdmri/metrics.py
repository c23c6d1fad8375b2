"""Classification metrics from labels and class probabilities, computed with scikit-learn.

Undefined values (a class with no images, a ratio with a zero denominator) are
reported as NaN, never as a silent 0.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn import metrics as skm


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray,
                           class_names: tuple[str, ...] | list[str]) -> dict:
    """Return accuracy, per-class and averaged precision/recall/F1, and the confusion matrix.

    The headline figures are also named plainly: glioma_recall (missed gliomas are
    the costliest error) and notumor_precision (a wrong "no tumor" is false
    reassurance), when those classes exist.
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
            p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                             average=average, zero_division=np.nan)
            result[f"{average}_avg"] = {"precision": _num(p), "recall": _num(r), "f1": _num(f)}

    result["per_class"] = {
        name: {"precision": _num(precision[i]), "recall": _num(recall[i]), "f1": _num(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    if "glioma" in class_names:
        result["glioma_recall"] = result["per_class"]["glioma"]["recall"]
    if "notumor" in class_names:
        result["notumor_precision"] = result["per_class"]["notumor"]["precision"]
    result["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return result


def _num(value) -> float:
    value = float(value)
    return value if not math.isnan(value) else math.nan
