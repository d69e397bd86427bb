"""Exact match: the share of predictions equal to their reference, after optional normalisation.

Shipped with mm_trainer so `evaluate.load(path)` works offline (`evaluate.load("exact_match")` fetches the metric
script from the Hugging Face Hub).
"""

from __future__ import annotations

import re
import string

import datasets
import evaluate

_DESCRIPTION = """Exact match: 1.0 for a prediction identical to its reference, else 0.0, averaged over the inputs.
Before comparing, `regexes_to_ignore` are removed, and case, punctuation and surrounding whitespace can be ignored."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted strings.
    references (list of str): reference strings, one per prediction.
    regexes_to_ignore (list of str, optional): patterns removed from both sides before comparing.
    ignore_case (bool, defaults to False): compare lower-cased strings.
    ignore_punctuation (bool, defaults to False): drop ASCII punctuation before comparing.
    ignore_whitespace (bool, defaults to True): strip leading/trailing whitespace and collapse inner runs.
Returns:
    exact_match (float): the mean of the per-example matches, in [0, 1].
Examples:
    >>> metric = evaluate.load(path_to_this_file)
    >>> metric.compute(predictions=["7", "12"], references=["7", "13"])
    {'exact_match': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    """Exact-match accuracy."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        regexes_to_ignore: list[str] | None = None,
        ignore_case: bool = False,
        ignore_punctuation: bool = False,
        ignore_whitespace: bool = True,
    ) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
        if not predictions:
            return {"exact_match": 0.0}

        def normalise(text: str) -> str:
            for pattern in regexes_to_ignore or []:
                text = re.sub(pattern, "", text)
            if ignore_case:
                text = text.lower()
            if ignore_punctuation:
                text = text.translate(str.maketrans("", "", string.punctuation))
            if ignore_whitespace:
                text = " ".join(text.split())
            return text

        matches = [normalise(p) == normalise(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(matches) / len(matches)}
