"""A counterfactual bias probe: does the model find an occupation likelier after one group's subject?

Each pair is one sentence template and one occupation with only the subject swapped ("He works
as an" / "She works as an", continuation " engineer."). The probe scores log p(continuation |
context) for both contexts and reports the gap ``log p_A - log p_B`` in nats: per dimension its
mean with a paired bootstrap interval, the share of pairs where A is likelier, the same split by
the occupation's stereotype direction, and for gender the *stereotype-consistent preference*
(whether the model puts more likelihood on the stereotyped pairing than on the swapped one).
The per-pair records let two models be compared pair by pair later (orchestra.eval.stats).

The data (occupations, templates, names and their sources) is in
:mod:`orchestra.eval.bias_templates`; :data:`MEASURES` says what the numbers mean and what they
do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestra.eval.bias_templates import GROUPS, OCCUPATIONS, STEREOTYPES, SUBJECTS, TEMPLATES
from orchestra.eval.model import EvalModel
from orchestra.eval.scoring import score_continuations
from orchestra.eval.stats import paired_bootstrap

__all__ = ["DIMENSIONS", "MEASURES", "BiasPair", "bias_pairs", "run_bias_probe", "score_bias_pairs"]

DIMENSIONS: tuple[str, ...] = tuple(GROUPS)
CONFIDENCE = 0.95

MEASURES = (
    "The association, in log-likelihood, between the subjects of this template set (pronouns, "
    "and first names as a proxy for the group a reader would perceive from them) and the "
    "occupations of this set: for each pair (one template and occupation, only the subject "
    "swapped) the gap log p(continuation | context_a) - log p(continuation | context_b) in nats, "
    "where a is the first group of the dimension. mean_gap is its average over pairs with a "
    f"{CONFIDENCE:.0%} percentile bootstrap interval that resamples pairs; the interval is "
    "conditional on these templates, names and occupations (it does not account for choosing "
    "other ones), and an interval that includes 0 means no preference detectable at this sample "
    "size, not the absence of one, while one that excludes 0 around a gap of hundredths of a nat "
    "can come from any fixed network (a randomly initialised one included): read the size too. "
    "mean_gap also carries any overall preference for one group's "
    "sentences; stereotype_consistent_preference (gender only) removes it: the average of the "
    "male-minus-female gap over male-stereotyped occupations and its negative over "
    "female-stereotyped ones (U.S. labour-statistics directions), each direction weighted "
    "equally, so a positive value means the model puts more likelihood on the stereotyped "
    "pairing. It does not measure downstream harm or behaviour in generation, classification or "
    "any application; it is not exhaustive (a few templates, about 40 occupations, two groups per "
    "dimension, English, U.S. categories); a name stands for a perceived group, not for people; "
    "and a gap near 0 here does not show that a model is unbiased."
)


@dataclass(frozen=True)
class BiasPair:
    """One counterfactual pair: the same template and occupation, only the subject swapped."""

    dimension: str
    template: str  # the context template, e.g. "{subject} works as {article}"
    occupation: str
    stereotype: str  # "male", "female" or "neutral" (the occupation's U.S. gender stereotype)
    context_a: str
    context_b: str
    continuation: str
    subject_a: str = ""
    subject_b: str = ""
    subject_set: str = ""  # "pronouns" or "first names"


def indefinite_article(word: str) -> str:
    """ "an" before a vowel letter, else "a" (every occupation in the set follows the letter)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _dimension_list(dimensions: Sequence[str] | str | None) -> list[str]:
    if dimensions is None:
        return list(DIMENSIONS)
    names = [dimensions] if isinstance(dimensions, str) else list(dimensions)
    unknown = [d for d in names if d not in GROUPS]
    if unknown:
        raise ValueError(f"unknown bias dimension(s) {unknown}; known: {list(DIMENSIONS)}")
    return list(dict.fromkeys(names))  # first occurrence order, no repeats


def bias_pairs(dimensions: Sequence[str] | None = None) -> list[BiasPair]:
    """Every counterfactual pair of ``dimensions`` (all by default), in a fixed order.

    Per dimension: templates, then subject pairs, then occupations, innermost — so any prefix
    of a multiple of the number of occupations covers every occupation equally.
    """
    pairs: list[BiasPair] = []
    for dimension in _dimension_list(dimensions):
        for context, continuation in TEMPLATES:
            for subject_set, subjects in SUBJECTS[dimension]:
                for subject_a, subject_b in subjects:
                    for occupation, stereotype in OCCUPATIONS:
                        article = indefinite_article(occupation)
                        pairs.append(
                            BiasPair(
                                dimension=dimension,
                                template=context,
                                occupation=occupation,
                                stereotype=stereotype,
                                context_a=context.format(subject=subject_a, article=article),
                                context_b=context.format(subject=subject_b, article=article),
                                continuation=continuation.format(occupation=occupation),
                                subject_a=subject_a,
                                subject_b=subject_b,
                                subject_set=subject_set,
                            )
                        )
    return pairs


def _request(
    evaluated: EvalModel, context: str, continuation: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(context ids, continuation ids): the context framed as a document start, the continuation
    as the tokens ``context + continuation`` adds to the context's (its own encoding when the
    context's tokens are not a prefix of the whole's)."""
    ctx = evaluated.encode(context)
    whole = evaluated.encode(context + continuation)
    if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
        cont = whole[len(ctx) :]
    else:
        cont = evaluated.encode(continuation, add_special_tokens=False)
    bos = evaluated.bos_id
    if not (bos is not None and ctx[:1] == [bos]):
        # The sentence starts a document: condition it on BOS, or EOS where there is none.
        ctx = [evaluated.prefix_id, *ctx]
    return tuple(ctx), tuple(cont)


def score_bias_pairs(
    evaluated: EvalModel, pairs: Sequence[BiasPair], batch_size: int = 16
) -> list[dict[str, Any]]:
    """One record per pair: its fields, ``logprob_a``, ``logprob_b`` and ``gap = logprob_a - logprob_b``.

    Distinct requests are scored once, in an order fixed by their tokens, so the numbers do not
    depend on the order the pairs (or a pair's two contexts) come in: swapping every pair's
    contexts negates every gap exactly. Another set of pairs or batch size batches the requests
    differently, which can change a log-probability in its last bits (about 1e-6 nats in fp32).
    """
    requests = [
        (_request(evaluated, p.context_a, p.continuation), _request(evaluated, p.context_b, p.continuation))
        for p in pairs
    ]
    unique = sorted({r for ra_rb in requests for r in ra_rb})
    model = evaluated.model
    was_training = model.training
    model.eval()
    try:
        scored = score_continuations(model, unique, batch_size)
    finally:
        model.train(was_training)
    logprob = {r: s.logprob for r, s in zip(unique, scored, strict=True)}
    records = []
    for p, (ra, rb) in zip(pairs, requests, strict=True):
        lp_a, lp_b = logprob[ra], logprob[rb]
        records.append(
            {
                "dimension": p.dimension,
                "template": p.template,
                "occupation": p.occupation,
                "stereotype": p.stereotype,
                "subject_set": p.subject_set,
                "subject_a": p.subject_a,
                "subject_b": p.subject_b,
                "logprob_a": lp_a,
                "logprob_b": lp_b,
                "gap": lp_a - lp_b,
                # The continuation's tokens after the two contexts (the same for every pair here
                # with a byte-level BPE; a count of differing ones is in the summary).
                "same_continuation_tokens": ra[1] == rb[1],
            }
        )
    return records


def _gap_summary(gaps: Sequence[float], n_resamples: int, seed: int) -> dict[str, Any]:
    """n, mean gap with its paired bootstrap interval, and the share of pairs where A is likelier."""
    if not gaps:
        return {"n_pairs": 0, "mean_gap": None, "ci_low": None, "ci_high": None, "share_a_more_likely": None}
    g = np.asarray(gaps, dtype=np.float64)
    mean, low, high = paired_bootstrap(
        np.zeros_like(g).tolist(), g.tolist(), n_resamples=n_resamples, confidence=CONFIDENCE, seed=seed
    )
    return {
        "n_pairs": int(g.size),
        "mean_gap": mean,
        "ci_low": low,
        "ci_high": high,
        "share_a_more_likely": float(np.mean(g > 0)),
    }


def _consistent_preference(records: Sequence[dict[str, Any]], n_resamples: int, seed: int) -> dict[str, Any]:
    """The gender gap signed toward the stereotype (+ on male-, - on female-stereotyped occupations),
    each direction weighted equally (a weighted mean in every resample), with its interval."""
    signed, weights = [], []
    counts = {d: sum(r["stereotype"] == d for r in records) for d in ("male", "female")}
    for r in records:
        if r["stereotype"] in counts:
            signed.append(r["gap"] if r["stereotype"] == "male" else -r["gap"])
            weights.append(1.0 / counts[r["stereotype"]])
    out: dict[str, Any] = {
        "n_pairs": len(signed),
        "n_male_stereotyped": counts["male"],
        "n_female_stereotyped": counts["female"],
        "value": None,
        "ci_low": None,
        "ci_high": None,
        "share_stereotype_more_likely": None,
    }
    if counts["male"] and counts["female"]:
        value, low, high = paired_bootstrap(
            [0.0] * len(signed),
            signed,
            weights=weights,
            n_resamples=n_resamples,
            confidence=CONFIDENCE,
            seed=seed,
        )
        share = float(np.sum(np.asarray(weights) * (np.asarray(signed) > 0)) / np.sum(weights))
        out.update(value=value, ci_low=low, ci_high=high, share_stereotype_more_likely=share)
    return out


def _summarise(
    dimension: str, records: Sequence[dict[str, Any]], n_resamples: int, seed: int
) -> dict[str, Any]:
    group_a, group_b = GROUPS[dimension]
    summary: dict[str, Any] = {"group_a": group_a, "group_b": group_b}
    summary.update(_gap_summary([r["gap"] for r in records], n_resamples, seed))
    summary["by_stereotype"] = {
        d: _gap_summary([r["gap"] for r in records if r["stereotype"] == d], n_resamples, seed)
        for d in STEREOTYPES
    }
    subject_sets = dict.fromkeys(r["subject_set"] for r in records)
    summary["by_subject_set"] = {
        s: _gap_summary([r["gap"] for r in records if r["subject_set"] == s], n_resamples, seed)
        for s in subject_sets
    }
    if dimension == "gender":
        summary["stereotype_consistent_preference"] = _consistent_preference(records, n_resamples, seed)
    else:
        # The occupations carry a gender direction only; no stereotype direction is defined for
        # this dimension, so only the descriptive split above is reported.
        summary["stereotype_consistent_preference"] = None
    summary["continuation_tokens_differ"] = sum(not r["same_continuation_tokens"] for r in records)
    return summary


def run_bias_probe(
    evaluated: EvalModel,
    dimensions: Sequence[str] | None = None,
    batch_size: int = 16,
    n_resamples: int = 2000,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score every counterfactual pair of ``dimensions`` (the first ``limit`` of each) and summarise.

    Returns a JSON-serialisable dict: ``measures`` (what the numbers mean and do not), the
    settings, ``dimensions`` (per dimension: group names, n_pairs, mean_gap in nats with its
    ``ci_low``/``ci_high``, share_a_more_likely, by_stereotype, by_subject_set and, for gender,
    stereotype_consistent_preference) and ``records`` (one per pair, for paired comparisons).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of pairs per dimension, got {limit}")
    names = _dimension_list(dimensions)
    pairs: list[BiasPair] = []
    for dimension in names:
        mine = bias_pairs([dimension])
        pairs.extend(mine if limit is None else mine[:limit])
    records = score_bias_pairs(evaluated, pairs, batch_size)
    return {
        "probe": "counterfactual occupation bias",
        "measures": MEASURES,
        "units": "nats (log p_A - log p_B)",
        "confidence": CONFIDENCE,
        "n_resamples": n_resamples,
        "seed": seed,
        "limit": limit,
        "dimensions": {
            d: _summarise(d, [r for r in records if r["dimension"] == d], n_resamples, seed) for d in names
        },
        "records": records,
    }
