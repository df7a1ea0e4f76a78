"""F1 score, binary or macro-averaged over classes (offline `evaluate` module; needs no scikit-learn)."""
import datasets
import evaluate

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids.
    references: true class ids.
    average: "binary" (default; F1 of class `pos_label`) or "macro" (unweighted mean over the classes seen).
    pos_label: the positive class for average="binary" (default 1).
Returns:
    f1: in [0, 1]; 0 for a class that is never predicted and never true.
Example:
    >>> evaluate.load("recipes/metrics/f1").compute(predictions=[1, 1, 0], references=[1, 0, 0])
    {'f1': 0.6666666666666666}
"""


def _f1_of(label, predictions, references):
    tp = sum(1 for p, r in zip(predictions, references) if p == label and r == label)
    fp = sum(1 for p, r in zip(predictions, references) if p == label and r != label)
    fn = sum(1 for p, r in zip(predictions, references) if p != label and r == label)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        if not predictions:
            raise ValueError("f1: no predictions")
        if average == "binary":
            return {"f1": _f1_of(pos_label, predictions, references)}
        if average == "macro":
            labels = sorted(set(predictions) | set(references))
            return {"f1": sum(_f1_of(c, predictions, references) for c in labels) / len(labels)}
        raise ValueError(f"f1: average={average!r} is not supported; use 'binary' or 'macro'")
