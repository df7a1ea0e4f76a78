"""Corpus perplexity from per-sequence summed negative log-likelihoods (offline `evaluate` module).

Unlike the Hub's `evaluate-metric/perplexity`, which loads a model by id and scores raw text, this
metric scores losses already computed by the model being trained, so it works on any in-memory model.
"""
import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity = exp(total NLL / total tokens); also returns the mean token loss."
_KWARGS_DESCRIPTION = """
Args:
    nll_sum: per sequence, the summed negative log-likelihood (natural log) of its predicted tokens.
    num_tokens: per sequence, how many tokens were predicted.
Returns:
    loss: mean NLL per token; perplexity: exp(loss) (inf when it overflows).
Example:
    >>> m = evaluate.load("recipes/metrics/perplexity")
    >>> m.compute(nll_sum=[2.0, 4.0], num_tokens=[2, 2])
    {'loss': 1.5, 'perplexity': 4.4816890703380645}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"),
                                        "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, num_tokens):
        total = sum(num_tokens)
        if total == 0:
            raise ValueError("perplexity: no predicted tokens (num_tokens sums to 0)")
        loss = math.fsum(nll_sum) / total
        try:
            perplexity = math.exp(loss)
        except OverflowError:
            perplexity = float("inf")
        return {"loss": loss, "perplexity": perplexity}
