"""The report's numbers equal a confusion matrix computed by hand."""

import numpy as np
import pytest

from train.metrics import classification_metrics, markdown_report


def test_metrics_match_hand_computed_confusion_matrix():
    labels = ["Parasitized", "Uninfected"]
    # true:      P P P P P U U U U U U
    # predicted: P P P U U U U U U U P
    y_true = [0] * 5 + [1] * 6
    y_pred = [0, 0, 0, 1, 1] + [1, 1, 1, 1, 1, 0]
    probs = np.eye(2)[y_pred] * 0.8 + 0.1
    m = classification_metrics(y_true, probs, labels, "Parasitized")
    # TP=3 FN=2 FP=1 TN=5
    assert m["confusion_matrix"] == [[3, 2], [1, 5]]
    assert m["accuracy"] == pytest.approx(8 / 11)
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(5 / 6)
    p = m["per_class"]["Parasitized"]
    assert p["precision"] == pytest.approx(3 / 4) and p["recall"] == pytest.approx(3 / 5)
    assert p["f1"] == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    u = m["per_class"]["Uninfected"]
    assert u["precision"] == pytest.approx(5 / 7) and u["recall"] == pytest.approx(5 / 6) and u["support"] == 6
    assert m["macro_avg"]["recall"] == pytest.approx((3 / 5 + 5 / 6) / 2)
    assert m["weighted_avg"]["recall"] == pytest.approx((5 * 3 / 5 + 6 * 5 / 6) / 11)
    # Probabilities are just 0.9/0.1: AUC from ranks = P(score_pos > score_neg) + ties/2
    pos, neg = probs[:5, 0], probs[5:, 0]
    auc = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert m["roc_auc"] == pytest.approx(auc)
    assert m["n_images"] == 11 and m["labels"] == labels
    md = markdown_report(m)
    assert "| Parasitized | 3 | 2 |" in md and "0.7273" in md


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="does not match"):
        classification_metrics([0, 1], np.ones((3, 2)) / 2, ["a", "b"])
