"""Evaluation metrics over verifier categories (docs/method.md, benchmarks and metrics), with bootstrap confidence
intervals.

For one data set, let n be the number of answers (one per image; as in the original evaluator, answers the
verifier failed on, `verifier error`, count in n: they are neither correct nor wrong, score 0, and are also
reported on their own) and #x the number of answers in category x:

    correctness  C  = (#specific + #more specific + #less specific + #generic) / n
    specificity  S  = (#specific + #more specific) / (#specific + #more specific + #less specific + #generic)
    harmonic mean HM = 2 C S / (C + S)
    specificity over all answers  S_all = (#specific + #more specific) / n,  HM_all = 2 C S_all / (C + S_all)
    score           = mean weight, with specific = more specific = 1, less specific = 0.6, generic = 0.2,
                      abstain = 0, wrong = -1, parse failure = -1

The paper does not publish its exact C and S formulas, so specificity is reported both ways: S among the correct
answers (how fine the model is when it is right) and S_all among all answers (how often it is right at the finest
level); they rank methods differently when one trades correctness for specificity.

Parse failures and abstentions count in n, so they lower C. Conventions for the corner cases: with no correct
answer S = 0 and HM = 0; an empty data set (n = 0) has every metric NaN.

Best-of-N keeps, per image, the answer of lowest rank, as the original evaluator ranks them: more specific <
specific < less specific < generic < abstain < wrong < parse failure < verifier error (training's reward ties
more specific with specific; here the finer correct answer wins); among equally ranked answers the one sampled
first wins. "Overall" pools the answers of every data set (each image weighs the same); "mean"
averages the per-data-set metrics (each data set weighs the same).

Confidence intervals are percentile bootstraps over images. Every metric here depends on the category counts
only, and resampling n images with replacement draws those counts from a multinomial with the observed
shares, so each bootstrap replicate is one multinomial draw: exact, and fast for any n. The pooled and mean
intervals resample each data set on its own (a stratified bootstrap).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from speciarl_jax.rewards import categories as cat

CATEGORIES: tuple[str, ...] = cat.ALL_CATEGORIES  # the order of every count vector here
_INDEX = {name: i for i, name in enumerate(CATEGORIES)}
_CORRECT = np.array([name in cat.CORRECT for name in CATEGORIES])
_SPECIFIC = np.array([name in (cat.SPECIFIC, cat.MORE_SPECIFIC) for name in CATEGORIES])

SCORE_WEIGHTS: dict[str, float] = {
    cat.SPECIFIC: 1.0,
    cat.MORE_SPECIFIC: 1.0,
    cat.LESS_SPECIFIC: 0.6,
    cat.GENERIC: 0.2,
    cat.ABSTAIN: 0.0,
    cat.WRONG: -1.0,
    cat.PARSE_FAILURE: -1.0,
}
_WEIGHTS = np.array([SCORE_WEIGHTS.get(name, 0.0) for name in CATEGORIES])

# Best-of-N order (the original evaluator's): finer correct answers first, then answers that could not be parsed,
# then answers never graded.
SELECTION_RANK: dict[str, int] = {name: i for i, name in enumerate((
    cat.MORE_SPECIFIC, cat.SPECIFIC, cat.LESS_SPECIFIC, cat.GENERIC, cat.ABSTAIN, cat.WRONG, cat.PARSE_FAILURE,
    cat.VERIFIER_ERROR))}

HEADLINE = ("correctness", "specificity", "hm", "specificity_all", "hm_all", "score")
WITH_INTERVALS = ("correctness", "specificity", "hm", "specificity_all", "hm_all")


def count_categories(categories: Iterable[str]) -> np.ndarray:
    """[8] int64 counts in `CATEGORIES` order; an unknown category raises, naming it."""
    counts = np.zeros(len(CATEGORIES), np.int64)
    for name in categories:
        index = _INDEX.get(name)
        if index is None:
            raise ValueError(f"unknown category {name!r}; expected one of {list(CATEGORIES)}")
        counts[index] += 1
    return counts


def metrics_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """C, S, HM, S_all, HM_all and score from counts [..., 8] (any leading shape); each result has the leading
    shape."""
    counts = np.asarray(counts, np.float64)
    n = counts.sum(-1)  # every answer, verifier errors included
    correct = (counts * _CORRECT).sum(-1)
    specific = (counts * _SPECIFIC).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(n > 0, correct / np.where(n > 0, n, 1), np.nan)
        s = np.where(correct > 0, specific / np.where(correct > 0, correct, 1), 0.0)
        s = np.where(n > 0, s, np.nan)
        s_all = np.where(n > 0, specific / np.where(n > 0, n, 1), np.nan)
        score = np.where(n > 0, (counts * _WEIGHTS).sum(-1) / np.where(n > 0, n, 1), np.nan)
    return {"correctness": c, "specificity": s, "hm": _harmonic(c, s, n), "specificity_all": s_all,
            "hm_all": _harmonic(c, s_all, n), "score": score}


def _harmonic(c, s, n):
    """2 c s / (c + s); 0 when both are 0, NaN without answers."""
    with np.errstate(invalid="ignore", divide="ignore"):
        denominator = c + s
        hm = np.where(denominator > 0, 2 * c * s / np.where(denominator > 0, denominator, 1), 0.0)
    return np.where(n > 0, hm, np.nan)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """The numbers for one data set (or a pool of them).

    counts: answers per category (all eight, verifier errors included).
    n: all answers (verifier errors included): the denominator of C, S_all, the shares and the score.
    intervals: (low, high) bootstrap bounds for C, S, HM, S_all and HM_all; empty when no bootstrap was run.
    """

    counts: Mapping[str, int]
    correctness: float
    specificity: float
    hm: float
    score: float
    specificity_all: float = math.nan  # S over all n answers
    hm_all: float = math.nan  # HM of C and S_all
    intervals: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    mean_shares: Mapping[str, float] | None = None  # "mean" rows: the data sets' shares averaged

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    @property
    def verifier_errors(self) -> int:
        return self.counts.get(cat.VERIFIER_ERROR, 0)

    def shares(self) -> dict[str, float]:
        """Share of each category among the n answers (NaN when n = 0), verifier errors included."""
        if self.mean_shares is not None:
            return dict(self.mean_shares)
        n = self.n
        return {k: (v / n if n else math.nan) for k, v in self.counts.items()}

    def to_dict(self) -> dict:
        """A flat JSON-able record: n, counts, shares, the four metrics and their interval bounds."""
        out: dict = {"n": self.n, "verifier_errors": self.verifier_errors}
        out.update({f"count/{k}": int(v) for k, v in self.counts.items()})
        out.update({f"share/{k}": v for k, v in self.shares().items()})
        for key in HEADLINE:
            out[key] = getattr(self, key)
            if key in self.intervals:
                out[f"{key}_low"], out[f"{key}_high"] = self.intervals[key]
        return out


def _from_counts(counts: np.ndarray, intervals=None) -> Metrics:
    values = metrics_from_counts(counts)
    return Metrics(
        counts={name: int(counts[i]) for i, name in enumerate(CATEGORIES)},
        intervals=intervals or {},
        **{k: float(v) for k, v in values.items()},
    )


def _draw(counts: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """[samples, 8] bootstrap counts: the n answers redrawn with the observed shares."""
    n = int(counts.sum())
    draws = np.zeros((samples, len(CATEGORIES)), np.int64)
    if n:
        draws[:] = rng.multinomial(n, counts / n, size=samples)
    return draws


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if np.isnan(values).all():
        return math.nan, math.nan
    tail = 50.0 * (1.0 - level)
    low, high = np.nanpercentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _intervals(replicates: dict[str, np.ndarray], level: float) -> dict[str, tuple[float, float]]:
    return {key: _percentiles(replicates[key], level) for key in WITH_INTERVALS}


def summarize(
    categories: Iterable[str], *, bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> Metrics:
    """Metrics of one data set from its answers' categories (one per image), with `level` intervals from
    `bootstrap` replicates (0 = no intervals)."""
    return summarize_counts(count_categories(categories), bootstrap=bootstrap, seed=seed, level=level)


def summarize_counts(counts: np.ndarray, *, bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> Metrics:
    _check_bootstrap(bootstrap, level)
    counts = np.asarray(counts, np.int64)
    intervals = None
    if bootstrap:
        draws = _draw(counts, bootstrap, np.random.default_rng(seed))
        intervals = _intervals(metrics_from_counts(draws), level)
    return _from_counts(counts, intervals)


def _check_bootstrap(bootstrap: int, level: float) -> None:
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 replicates, got {bootstrap}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")


def summarize_many(
    per_dataset: Mapping[str, Sequence[str] | np.ndarray], *, bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Metrics]:
    """Per-data-set metrics plus "overall" (answers pooled) and "mean" (data sets averaged).

    per_dataset maps a data set name to its categories (or to a [8] count vector). Data sets without answers
    get NaN metrics and are left out of "mean", whose counts are the pooled ones but whose shares are the data
    sets' shares averaged; the bootstrap of "overall" and "mean" redraws every data
    set on its own with the same replicate index, so their intervals are those of a stratified bootstrap.
    """
    _check_bootstrap(bootstrap, level)
    if {"overall", "mean"} & set(per_dataset):
        raise ValueError("'overall' and 'mean' are reserved names; rename those data sets")
    counts = {
        name: np.asarray(v, np.int64) if isinstance(v, np.ndarray) else count_categories(v)
        for name, v in per_dataset.items()
    }
    rng = np.random.default_rng(seed)
    draws = {name: _draw(c, bootstrap, rng) for name, c in counts.items()} if bootstrap else {}
    out: dict[str, Metrics] = {}
    for name, c in counts.items():
        out[name] = _from_counts(c, _intervals(metrics_from_counts(draws[name]), level) if bootstrap else None)
    if not counts:
        return out

    total = sum(counts.values())
    pooled_intervals = None
    if bootstrap:
        pooled_intervals = _intervals(metrics_from_counts(sum(draws.values())), level)
    out["overall"] = _from_counts(total, pooled_intervals)

    nonempty = [name for name, c in counts.items() if c.sum() > 0]
    if nonempty:
        point = {k: float(np.mean([getattr(out[name], k) for name in nonempty])) for k in HEADLINE}
        mean_intervals = {}
        if bootstrap:
            per = [metrics_from_counts(draws[name]) for name in nonempty]
            mean_intervals = _intervals({k: np.mean([p[k] for p in per], axis=0) for k in WITH_INTERVALS}, level)
        shares = [out[name].shares() for name in nonempty]
        out["mean"] = Metrics(
            counts={name: int(total[i]) for i, name in enumerate(CATEGORIES)}, intervals=mean_intervals,
            mean_shares={k: float(np.mean([s[k] for s in shares])) for k in shares[0]}, **point,
        )
    return out


def best_of_n(samples: Sequence[str]) -> tuple[str, int]:
    """The category kept for an image with several sampled answers, and the index of the answer kept.

    Lowest `SELECTION_RANK` wins; ties go to the earliest sample. Raises on an empty list.
    """
    if not samples:
        raise ValueError("best_of_n needs at least one sampled answer")
    best = 0
    for i, name in enumerate(samples):
        if name not in SELECTION_RANK:
            raise ValueError(f"unknown category {name!r}; expected one of {list(CATEGORIES)}")
        if SELECTION_RANK[name] < SELECTION_RANK[samples[best]]:
            best = i
    return samples[best], best


def select(per_image: Iterable[Sequence[str]], mode: str) -> list[str]:
    """One category per image from its samples' categories.

    mode: "first" keeps sample 0 (greedy decoding has one sample), "best" applies `best_of_n`.
    """
    if mode == "first":
        out = []
        for samples in per_image:
            if not samples:
                raise ValueError("an image without any sampled answer")
            out.append(samples[0])
        return out
    if mode == "best":
        return [best_of_n(samples)[0] for samples in per_image]
    raise ValueError(f"selection mode must be 'first' or 'best', got {mode!r}")


def batch_report(categories: Sequence[str], prefix: str = "") -> dict[str, float]:
    """Category shares and the headline metrics of a list of verdicts, as flat log keys (training's logs)."""
    record = summarize(categories, bootstrap=0).to_dict()
    out = {f"{prefix}{k}": record[k] for k in HEADLINE}
    out.update({f"{prefix}share/{k[6:]}": v for k, v in record.items() if k.startswith("share/")})
    return out


def before_after_table(before: Mapping[str, float], after: Mapping[str, float], prefix: str = "eval/") -> str:
    """A Markdown table of the held-out category shares and headline metrics before and after training."""
    keys = sorted(k[len(prefix):] for k in after if k.startswith(prefix + "share/"))
    keys += list(HEADLINE)
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key in keys:
        b, a = before.get(prefix + key, float("nan")), after.get(prefix + key, float("nan"))
        lines.append(f"| {key} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(lines)
