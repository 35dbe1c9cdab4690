"""Per-class metrics, the collapse warning, the eval table, the smoothed loss and the curves figure."""

from __future__ import annotations

import math

import pytest

from zopeft.metrics import EMA, class_metrics, collapse_warning, compare_line, majority_note, report_lines
from zopeft.plot import curves

GOLD = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
PRED = [0, 0, 1, 1, 2, 2, 2, 0, 2, 0]


def test_class_metrics_by_hand():
    m = class_metrics(GOLD, PRED, ["a", "b", "c", "d"], [" A", " B", " C", " D"])
    assert m["confusion"] == [[3, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    a, b, c, d = (m["per_class"][k] for k in "abcd")
    assert (a["precision"], a["recall"], a["support"], a["predicted"], a["word"]) == (3 / 4, 3 / 4, 4, 4, " A")
    assert (b["precision"], b["recall"]) == (1 / 2, 1 / 2) and (c["precision"], c["recall"]) == (3 / 4, 3 / 4)
    assert d == {"word": " D", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
    assert m["accuracy"] == 7 / 10
    assert m["accuracy_stderr"] == pytest.approx(math.sqrt(0.7 * 0.3 / 9))  # as lm-evaluation-harness's acc_stderr
    assert class_metrics([0], [0], ["a"])["accuracy_stderr"] == 0.0
    assert m["macro_f1"] == pytest.approx((3 / 4 + 1 / 2 + 3 / 4) / 3)  # d occurs nowhere: not averaged


def test_collapse_onto_one_label_is_warned_about():
    collapsed = {"n": 10, **class_metrics(GOLD, [2] * 10, ["a", "b", "c"], [" A", " B", " C"])}
    assert collapse_warning(collapsed) == ("label c (' C') takes 10 of 10 predictions (100.0%; 40.0% of the gold "
                                           "labels): the predictions have collapsed onto one label")
    assert collapse_warning({"n": 10, **class_metrics(GOLD, PRED, ["a", "b", "c"])}) is None
    mostly_c = [2] * 9 + [0]  # the data is 90% c: predicting c 90% of the time is no collapse
    assert collapse_warning({"n": 10, **class_metrics(mostly_c, mostly_c, ["a", "b", "c"])}) is None


def test_collapse_onto_two_of_five_labels_is_warned_about():
    """The case the one-label rule missed: 92% of the predictions on two of five balanced labels (40% of the gold)."""
    gold = [label for label in range(5) for _ in range(40)]
    pred = [1] * 92 + [3] * 92 + [0, 2, 4] * 5 + [0]
    labels, words = ["a", "b", "c", "d", "e"], [" A", " B", " C", " D", " E"]
    warning = collapse_warning({"n": 200, **class_metrics(gold, pred, labels, words)})
    assert warning == ("labels b (' B') and d (' D') take 184 of 200 predictions (92.0%; 40.0% of the gold labels): "
                       "the predictions have collapsed onto 2 of 5 labels")
    spread = [label for label in range(5) for _ in range(40)][5:] + [0] * 5  # a drift towards one label, not a collapse
    assert collapse_warning({"n": 200, **class_metrics(gold, spread, labels)}) is None
    skewed = [0] * 170 + [1] * 30  # gold 85% a: predicting a 90% of the time is no collapse
    assert collapse_warning({"n": 200, **class_metrics(skewed, [0] * 180 + [1] * 20, labels)}) is None


def test_an_accuracy_no_better_than_always_answering_the_majority_label_is_noted():
    """BoolQ's case: 62% of the gold answers are "Yes"; a model at 0.56 does worse than always saying it."""
    gold = [1] * 124 + [0] * 76
    pred = [1] * 100 + [0] * 24 + [1] * 36 + [0] * 40  # 100 + 40 right: 0.70
    labels, words = ["0", "1"], [" No", " Yes"]
    assert majority_note(class_metrics(gold, pred, labels, words)) is None
    worse = [1] * 80 + [0] * 44 + [1] * 44 + [0] * 32  # 80 + 32 right: 0.56
    assert majority_note(class_metrics(gold, worse, labels, words)) == (
        "always answering 1 (' Yes'), the most common gold label, would score 0.6200 on these 200 records, at least "
        "this accuracy (0.5600)")
    collapsed = class_metrics(gold, [1] * 200, labels, words)  # onto the majority label: exactly its share
    assert majority_note(collapsed) is not None and collapsed["accuracy"] == 0.62
    assert majority_note({"loss": 2.0, "perplexity": 7.4}) is None  # no labels (sft, generation)


def test_report_lines_show_the_table_and_the_confusion_matrix():
    metrics = {"loss": 1.25, "n": 10, **class_metrics(GOLD, PRED, ["a", "b", "c"], [" A", " B", " C"])}
    lines = report_lines(metrics)
    assert lines[0] == "accuracy 0.7000 ±0.1528  macro-F1 0.6667  loss 1.2500  n 10"
    assert lines[2].split() == ["a", "('", "A')", "0.750", "0.750", "0.750", "4", "4"]
    assert lines[5] == "confusion (rows: gold, columns: predicted):"
    assert [line.split() for line in lines[6:]] == [["a", "b", "c"], ["a", "3", "1", "0"], ["b", "0", "1", "1"],
                                                     ["c", "1", "0", "3"]]
    assert report_lines({"loss": 2.0, "perplexity": math.exp(2), "n": 3}) == ["loss 2.0000  perplexity 7.3891  n 3"]
    assert compare_line({"accuracy": 0.5, "loss": 2.0}, {"accuracy": 0.75, "loss": 1.0}) == (
        "accuracy 0.5000 -> 0.7500, loss 2.0000 -> 1.0000")
    assert compare_line({"accuracy": 0.5}, {"accuracy": 0.75, "accuracy_stderr": 0.0306}) == "accuracy 0.5000 -> 0.7500 ±0.0306"


def test_ema_starts_at_the_first_loss_and_skips_non_finite_ones():
    ema = EMA()
    assert ema.update(float("nan")) is None
    assert ema.update(4.0) == 4.0
    assert ema.update(float("inf")) == 4.0
    assert ema.update(2.0) == pytest.approx(0.9 * 4.0 + 0.1 * 2.0)


def test_curves_plot_raw_smoothed_and_eval_loss_against_forward_equivalents():
    log = [{"step": 0, "forward_passes": 0, "forward_equivalents": 0, "eval_loss": 3.0, "eval_accuracy": 0.5,
            "eval_macro_f1": 0.4}]
    log += [{"step": s, "forward_passes": s, "forward_equivalents": 3 * s, "loss": 3.0 - 0.1 * s, "loss_ema": 3.0}
            for s in range(1, 5)]
    log.append({"step": 4, "forward_passes": 4, "forward_equivalents": 12, "eval_loss": 2.5, "eval_accuracy": 0.7,
                "eval_macro_f1": 0.6})
    left, right = curves(log).axes
    assert left.get_legend_handles_labels()[1] == ["train (batch)", "train (EMA)", "eval"]
    assert list(left.lines[2].get_xdata()) == [0, 12] and list(left.lines[2].get_ydata()) == [3.0, 2.5]
    assert list(left.lines[0].get_xdata()) == [3, 6, 9, 12]  # a backward pass counts as two forwards
    assert right.get_legend_handles_labels()[1] == ["accuracy", "macro-F1"]
    assert "forward-pass equivalents" in left.get_xlabel()
    judged = [{"step": s, "forward_passes": s, "forward_equivalents": 3 * s, "select_accuracy": a, "select_loss": 2.0}
              for s, a in ((0, 0.55), (4, 0.75))]  # zo.guard.select_size's records
    right = curves(log + judged).axes[1]
    assert right.get_legend_handles_labels()[1] == ["accuracy", "accuracy (guard's records)", "macro-F1"]
    assert list(right.lines[1].get_xdata()) == [0, 12] and list(right.lines[1].get_ydata()) == [0.55, 0.75]
