"""hvdmri.metrics on small examples whose every value is worked out by hand below."""

import json
import math

import numpy as np
import pytest

from hvdmri.metrics import calibration_metrics, classification_metrics, headline, screening_metrics
from hvdmri.runs import json_safe

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")

# Eight images. Columns: P(glioma), P(meningioma), P(notumor), P(pituitary).
#   image  true        predicted (argmax)
#   0      glioma      glioma
#   1      glioma      glioma
#   2      glioma      notumor     (a missed glioma)
#   3      meningioma  meningioma
#   4      meningioma  meningioma
#   5      notumor     notumor
#   6      notumor     pituitary
#   7      pituitary   pituitary
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 3])
PROBABILITIES = np.array([
    [0.70, 0.10, 0.10, 0.10],
    [0.60, 0.20, 0.10, 0.10],
    [0.20, 0.10, 0.60, 0.10],
    [0.10, 0.80, 0.05, 0.05],
    [0.30, 0.40, 0.20, 0.10],
    [0.10, 0.10, 0.70, 0.10],
    [0.10, 0.10, 0.30, 0.50],
    [0.10, 0.10, 0.10, 0.70],
])


@pytest.fixture(scope="module")
def example():
    return classification_metrics(Y_TRUE, PROBABILITIES, CLASSES)


def test_confusion_matrix_by_hand(example):
    # Rows are true classes, columns predicted, read off the table above.
    assert example["confusion_matrix"] == [
        [2, 0, 1, 0],
        [0, 2, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 0, 1],
    ]
    assert example["support"] == 8


def test_accuracy_and_balanced_accuracy_by_hand(example):
    # 6 of 8 on the diagonal.
    assert example["accuracy"] == pytest.approx(6 / 8)
    # Mean of the per-class recalls 2/3, 2/2, 1/2, 1/1 = (2/3 + 5/2) / 4 = 19/24.
    assert example["balanced_accuracy"] == pytest.approx(19 / 24)


def test_per_class_scores_by_hand(example):
    per_class = example["per_class"]
    # glioma: predicted twice, both right (precision 2/2); 2 of 3 found (recall 2/3);
    # F1 = 2 * 1 * 2/3 / (1 + 2/3) = 4/5.
    assert per_class["glioma"]["precision"] == pytest.approx(1.0)
    assert per_class["glioma"]["recall"] == pytest.approx(2 / 3)
    assert per_class["glioma"]["f1"] == pytest.approx(4 / 5)
    assert per_class["glioma"]["support"] == 3
    # meningioma: 2 predicted, 2 right, 2 present.
    assert per_class["meningioma"]["precision"] == pytest.approx(1.0)
    assert per_class["meningioma"]["recall"] == pytest.approx(1.0)
    assert per_class["meningioma"]["f1"] == pytest.approx(1.0)
    # notumor: predicted for images 2 and 5, only 5 right (1/2); found 5 of {5, 6} (1/2).
    assert per_class["notumor"]["precision"] == pytest.approx(1 / 2)
    assert per_class["notumor"]["recall"] == pytest.approx(1 / 2)
    assert per_class["notumor"]["f1"] == pytest.approx(1 / 2)
    # pituitary: predicted for 6 and 7, only 7 right (1/2); found 1 of 1;
    # F1 = 2 * 1/2 * 1 / (1/2 + 1) = 2/3.
    assert per_class["pituitary"]["precision"] == pytest.approx(1 / 2)
    assert per_class["pituitary"]["recall"] == pytest.approx(1.0)
    assert per_class["pituitary"]["f1"] == pytest.approx(2 / 3)
    assert per_class["pituitary"]["support"] == 1


def test_headline_names_by_hand(example):
    assert example["glioma_recall"] == pytest.approx(2 / 3)
    assert example["notumor_precision"] == pytest.approx(1 / 2)


def test_headline_line(example):
    assert headline(example) == ("accuracy 0.7500, balanced accuracy 0.7917, glioma recall 0.6667, "
                                 "no-tumor precision 0.5000")


def test_headline_undefined_precision_is_na():
    # No image is predicted "no tumor", so its precision is undefined: n/a, not nan.
    y_true = np.array([0, 2])
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    result = classification_metrics(y_true, probabilities, CLASSES)
    assert math.isnan(result["notumor_precision"])
    assert headline(result).endswith("glioma recall 1.0000, no-tumor precision n/a")


def test_averages_by_hand(example):
    # Macro: unweighted means of the per-class values above.
    assert example["macro_avg"]["precision"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert example["macro_avg"]["recall"] == pytest.approx(19 / 24)
    assert example["macro_avg"]["f1"] == pytest.approx((4 / 5 + 1 + 1 / 2 + 2 / 3) / 4)  # 89/120
    # Weighted by support 3, 2, 2, 1 out of 8.
    assert example["weighted_avg"]["precision"] == pytest.approx((3 * 1 + 2 * 1 + 2 * 0.5 + 1 * 0.5) / 8)
    assert example["weighted_avg"]["recall"] == pytest.approx(6 / 8)
    assert example["weighted_avg"]["f1"] == pytest.approx((3 * 4 / 5 + 2 * 1 + 2 * 1 / 2 + 1 * 2 / 3) / 8)


def test_cohen_kappa_by_hand(example):
    # Observed agreement p_o = 6/8. Chance agreement p_e = sum over classes of
    # (true count / 8) * (predicted count / 8) = (3*2 + 2*2 + 2*2 + 1*2) / 64 = 1/4.
    # kappa = (p_o - p_e) / (1 - p_e) = (3/4 - 1/4) / (3/4) = 2/3.
    assert example["cohen_kappa"] == pytest.approx(2 / 3)


def test_one_vs_rest_roc_auc_by_hand(example):
    # AUC = share of (positive, negative) pairs where the positive image scores higher.
    per_class = example["per_class"]
    # glioma: positives score 0.7, 0.6, 0.2; negatives 0.1, 0.3, 0.1, 0.1, 0.1.
    # 0.7 and 0.6 beat all 5; 0.2 beats the four 0.1s but not 0.3: 14 of 15 pairs.
    assert per_class["glioma"]["roc_auc"] == pytest.approx(14 / 15)
    # meningioma: positives 0.8 and 0.4 beat every negative (at most 0.2).
    assert per_class["meningioma"]["roc_auc"] == pytest.approx(1.0)
    # notumor: positives 0.7 and 0.3; negatives 0.1, 0.1, 0.6, 0.05, 0.2, 0.1.
    # 0.7 beats all 6; 0.3 beats all but 0.6: 11 of 12 pairs.
    assert per_class["notumor"]["roc_auc"] == pytest.approx(11 / 12)
    # pituitary: the one positive (0.7) beats every negative (at most 0.5).
    assert per_class["pituitary"]["roc_auc"] == pytest.approx(1.0)
    assert example["roc_auc_macro"] == pytest.approx((14 / 15 + 1 + 11 / 12 + 1) / 4)


def test_screening_by_hand():
    screening = screening_metrics(Y_TRUE, PROBABILITIES, CLASSES)
    # P(tumor) = 1 - P(notumor) = 0.9, 0.9, 0.4, 0.95, 0.8, 0.3, 0.7, 0.9.
    # Tumor images: 0, 1, 2, 3, 4, 7. No-tumor images: 5, 6.
    # Screened positive (P(tumor) >= 0.5): all but 2 and 5.
    assert screening["true_positives"] == 5   # 0, 1, 3, 4, 7
    assert screening["false_negatives"] == 1  # 2
    assert screening["true_negatives"] == 1   # 5
    assert screening["false_positives"] == 1  # 6
    assert screening["sensitivity"] == pytest.approx(5 / 6)
    assert screening["specificity"] == pytest.approx(1 / 2)
    # Tumor scores 0.9, 0.9, 0.4, 0.95, 0.8, 0.9 against no-tumor 0.3, 0.7:
    # 0.4 loses to 0.7, every other pair is won: 11 of 12.
    assert screening["roc_auc"] == pytest.approx(11 / 12)
    assert screening["threshold"] == 0.5


def test_screening_threshold_differs_from_argmax():
    # The argmax is "notumor" (0.4), but P(tumor) = 0.6 screens it positive.
    screening = screening_metrics(np.array([2, 0]), np.array([[0.3, 0.2, 0.4, 0.1], [0.9, 0.0, 0.1, 0.0]]),
                                  CLASSES)
    assert screening["false_positives"] == 1
    assert screening["specificity"] == pytest.approx(0.0)
    assert screening["sensitivity"] == pytest.approx(1.0)


def test_screening_without_notumor_class():
    assert screening_metrics(np.array([0, 1]), np.eye(2), ("a", "b")) == {}


def test_calibration_by_hand():
    y_true = np.array([0, 1, 2, 3, 0])
    probabilities = np.array([
        [0.95, 0.03, 0.01, 0.01],  # confidence 0.95, right
        [0.01, 0.95, 0.03, 0.01],  # confidence 0.95, right
        [0.85, 0.05, 0.05, 0.05],  # confidence 0.85, wrong
        [0.15, 0.10, 0.10, 0.65],  # confidence 0.65, right
        [0.15, 0.10, 0.65, 0.10],  # confidence 0.65, wrong
    ])
    calibration = calibration_metrics(y_true, probabilities, n_bins=10)
    # Bin [0.9, 1.0]: 2 images, accuracy 1, confidence 0.95, gap 0.05.
    # Bin [0.8, 0.9): 1 image, accuracy 0, confidence 0.85, gap 0.85.
    # Bin [0.6, 0.7): 2 images, accuracy 1/2, confidence 0.65, gap 0.15.
    # ECE = 2/5 * 0.05 + 1/5 * 0.85 + 2/5 * 0.15 = 0.02 + 0.17 + 0.06 = 0.25.
    assert calibration["ece"] == pytest.approx(0.25)
    bins = calibration["bins"]
    assert len(bins) == 10
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 0, 2, 0, 1, 2]
    assert bins[6]["accuracy"] == pytest.approx(0.5)
    assert bins[6]["confidence"] == pytest.approx(0.65)
    assert bins[8]["accuracy"] == pytest.approx(0.0)
    assert bins[9]["confidence"] == pytest.approx(0.95)
    assert math.isnan(bins[0]["accuracy"])
    assert bins[9]["lower"] == pytest.approx(0.9)
    assert bins[9]["upper"] == pytest.approx(1.0)


def test_calibration_confidence_one_in_last_bin():
    calibration = calibration_metrics(np.array([0]), np.array([[1.0, 0.0, 0.0, 0.0]]), n_bins=4)
    assert [b["count"] for b in calibration["bins"]] == [0, 0, 0, 1]
    assert calibration["ece"] == pytest.approx(0.0)


def test_calibration_rejects_zero_bins():
    with pytest.raises(ValueError, match="at least 1 bin"):
        calibration_metrics(Y_TRUE, PROBABILITIES, n_bins=0)


def test_absent_class_is_nan_and_null_in_json():
    # No pituitary image and none predicted: its precision, recall and AUC are undefined.
    y_true = np.array([0, 1, 2])
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    result = classification_metrics(y_true, probabilities, CLASSES)
    assert math.isnan(result["per_class"]["pituitary"]["recall"])
    assert math.isnan(result["per_class"]["pituitary"]["precision"])
    assert math.isnan(result["per_class"]["pituitary"]["roc_auc"])
    assert math.isnan(result["roc_auc_macro"])
    assert result["per_class"]["pituitary"]["support"] == 0
    # A class with neither images nor predictions is left out of the averages.
    assert result["macro_avg"]["recall"] == pytest.approx(1.0)
    assert result["macro_avg"]["precision"] == pytest.approx(1.0)

    text = json.dumps(json_safe(result), allow_nan=False)
    restored = json.loads(text)
    assert restored["per_class"]["pituitary"]["recall"] is None
    assert restored["roc_auc_macro"] is None
    assert restored["accuracy"] == pytest.approx(1.0)


def test_macro_precision_unpredicted_class_zero():
    # Two glioma images, both called meningioma: glioma precision is undefined (no
    # glioma predictions), but it must pull the macro precision down, not vanish.
    y_true = np.array([0, 0, 1, 2, 3])
    probabilities = np.array([[0.1, 0.7, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1],
                              [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    result = classification_metrics(y_true, probabilities, CLASSES)
    assert math.isnan(result["per_class"]["glioma"]["precision"])
    # meningioma 1/3, notumor 1, pituitary 1, glioma 0.
    assert result["macro_avg"]["precision"] == pytest.approx((0 + 1 / 3 + 1 + 1) / 4)
    assert result["macro_avg"]["recall"] == pytest.approx((0 + 1 + 1 + 1) / 4)


def test_json_safe_converts_numpy_values():
    converted = json_safe({"a": np.float32(0.5), "b": np.int64(3), "c": np.array([1.0, np.inf]),
                           "d": (np.bool_(True), math.nan)})
    assert converted == {"a": 0.5, "b": 3, "c": [1.0, None], "d": [True, None]}
    assert json.dumps(converted, allow_nan=False)


def test_no_images_gives_only_support():
    assert classification_metrics(np.zeros(0, int), np.zeros((0, 4)), CLASSES) == {"support": 0}


def test_existing_keys_kept_for_training(example):
    # hvdmri.train logs and saves these; renaming any breaks its metrics.json.
    for key in ("accuracy", "balanced_accuracy", "glioma_recall", "notumor_precision", "support",
                "per_class", "macro_avg", "weighted_avg", "confusion_matrix"):
        assert key in example
