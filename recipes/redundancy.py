"""Benchmark redundancy from SAE footprints (report §4): coverage, R̂(D), R(D), overlaps, partial correlations.

    >>> fps = {fp.name: fp[14] for fp in map(Footprints.load, paths)}          # see recipes.footprints
    >>> expected_coverage(fps["gsm8k"].support(), len(fps["gsm8k"]), [10, 100])  # c_n, exact (R8b)
    >>> report = redundancy_report(fps, scores=scores, correctness=correctness)
    >>> report.summary.drop_candidates, report.benchmarks["gsm8k"].feature_redundancy
    >>> write_report(report, "redundancy-report")          # recipes.reports: report.json, report.md, heatmaps

Feature coverage needs no Monte Carlo: a feature present in m of N samples is in a uniformly random n-subset with
probability 1 − C(N−m, n)/C(N, n) (R8a), so c_n is a sum over the distinct supports m, and R̂(D) = Σ_n c_n / |F(D)|
has the closed form (R10a). Only the performance profile τ_n (R6) is sampled: every draw is one random permutation
whose prefixes are uniform n-subsets for every n at once, and Kendall's τ is computed for all draws in one
vectorised step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import gammaln

from qscope_plugin.errors import QScopeError
from qscope_plugin.recipes.footprints import Footprints, LayerFootprints

KendallVariant = Literal["a", "b"]


class RedundancyError(QScopeError, ValueError):
    """Inputs to a redundancy metric that do not fit together."""


# --------------------------------------------------------------------------------------- feature metrics


def _supports(support: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct supports m, how many features K_m have each, and |F(D)|."""
    support = np.asarray(support)
    if support.size and (support.min() < 0 or support.max() > n_samples):
        raise RedundancyError(f"feature supports must lie in 0..N={n_samples}; got {support.min()}..{support.max()}")
    m, counts = np.unique(support[support > 0], return_counts=True)
    return m.astype(np.float64), counts.astype(np.float64), int(counts.sum())


def miss_probability(m: np.ndarray, n_samples: int, n: np.ndarray) -> np.ndarray:
    """C(N−m, n) / C(N, n): the chance that a random n-subset misses a feature of support m, ``(len(n), len(m))``."""
    big_n = float(n_samples)
    n = np.asarray(n, dtype=np.float64)[:, None]
    m = np.asarray(m, dtype=np.float64)[None, :]
    possible = n <= big_n - m
    rest = np.where(possible, big_n - m - n, 0.0)
    log_ratio = gammaln(big_n - m + 1) + gammaln(big_n - n + 1) - gammaln(rest + 1) - gammaln(big_n + 1)
    return np.where(possible, np.exp(np.minimum(log_ratio, 0.0)), 0.0)


def expected_coverage(support: np.ndarray, n_samples: int, n: int | Sequence[int] | np.ndarray | None = None,
                      *, block: int = 4096) -> np.ndarray:
    """c_n (R8) exactly, by (R8b), for each subset size in ``n`` (default: every n = 1..N).

    Args:
        support: ``m_j`` for each feature (zeros are ignored), e.g. ``LayerFootprints.support()``.
        n_samples: N, the benchmark's size.
    """
    m, counts, size = _supports(support, n_samples)
    grid = np.arange(1, n_samples + 1) if n is None else np.atleast_1d(np.asarray(n))
    if grid.size and (grid.min() < 1 or grid.max() > n_samples):
        raise RedundancyError(f"subset sizes must lie in 1..N={n_samples}; got {grid.min()}..{grid.max()}")
    if size == 0:
        raise RedundancyError("the footprint is empty (no feature fires on any sample); coverage is undefined")
    out = np.empty(grid.shape, dtype=np.float64)
    for start in range(0, grid.size, block):  # bounded memory: block × distinct supports
        part = grid[start : start + block]
        out[start : start + block] = 1.0 - miss_probability(m, n_samples, part) @ counts / size
    return out


def feature_redundancy(support: np.ndarray, n_samples: int) -> float:
    """R̂(D) = Σ_n c_n / |F(D)| (R10), by the closed form (R10a): [N − mean_j (N−m_j)/(m_j+1)] / |F(D)|."""
    m, counts, size = _supports(support, n_samples)
    if size == 0:
        raise RedundancyError("the footprint is empty (no feature fires on any sample); R̂ is undefined")
    missed = float(((n_samples - m) / (m + 1)) @ counts) / size
    return (n_samples - missed) / size


def samples_for_coverage(support: np.ndarray, n_samples: int, target: float = 0.9) -> int:
    """The smallest n with c_n ≥ ``target`` (c_n is non-decreasing, so a bisection)."""
    lo, hi = 1, n_samples
    while lo < hi:
        mid = (lo + hi) // 2
        if expected_coverage(support, n_samples, [mid])[0] >= target - 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return lo


def overlaps(features: Mapping[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """overlap(D1, D2) = |F1 ∩ F2| / |F1| (R11, row D1, column D2) and overlap_min (R12)."""
    names = list(features)
    sets = [np.unique(np.asarray(features[name])) for name in names]
    if any(s.size == 0 for s in sets):
        empty = [name for name, s in zip(names, sets, strict=True) if s.size == 0]
        raise RedundancyError(f"empty footprint for {empty}; overlaps are undefined")
    inter = np.array([[np.intersect1d(a, b, assume_unique=True).size for b in sets] for a in sets], dtype=float)
    sizes = np.array([s.size for s in sets], dtype=float)
    overlap = pd.DataFrame(inter / sizes[:, None], index=names, columns=names)
    overlap_min = pd.DataFrame(inter / np.minimum.outer(sizes, sizes), index=names, columns=names)
    return overlap, overlap_min


# ------------------------------------------------------------------------------------ performance metrics


def kendall_tau(x: np.ndarray, y: np.ndarray, variant: KendallVariant = "b") -> np.ndarray:
    """Kendall's τ between ``x`` ``(M,)`` and every row of ``y`` ``(..., M)``, vectorised.

    τ-b (default, as ``scipy.stats.kendalltau``) corrects for ties; τ-a divides by all M(M−1)/2 pairs. Where τ-b
    is undefined (every value of one side tied) the result is 0: such a subset orders no pair of models.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(x.shape[-1], k=1)
    sx = np.sign(x[j] - x[i])
    sy = np.sign(y[..., j] - y[..., i])
    concordance = sy @ sx
    if variant == "a":
        return concordance / max(len(i), 1)
    if variant != "b":
        raise RedundancyError(f"kendall variant {variant!r}; expected 'a' or 'b'")
    denominator = np.sqrt(np.abs(sx).sum() * np.abs(sy).sum(-1))
    return np.divide(concordance, denominator, out=np.zeros_like(concordance), where=denominator > 0)


def default_grid(n_samples: int, points: int = 128) -> np.ndarray:
    """Every n for small benchmarks, else ``points`` geometrically spaced sizes (τ_n moves most at small n)."""
    if n_samples <= 4 * points:
        return np.arange(1, n_samples + 1)
    return np.unique(np.round(np.geomspace(1, n_samples, points)).astype(int))


def redundancy_profile(correctness: np.ndarray, *, n_grid: Sequence[int] | np.ndarray | None = None,
                       n_draws: int = 200, seed: int = 0, variant: KendallVariant = "b",
                       ) -> tuple[np.ndarray, np.ndarray]:
    """τ_n (R6) by Monte Carlo: ``(n_grid, tau_n)`` for a ``(models, samples)`` score matrix.

    Each draw is one seeded random permutation of the samples; its length-n prefix is a uniform n-subset for
    every n, so one cumulative sum gives p̂(S) for the whole grid.
    """
    scores = np.asarray(correctness, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 1:
        raise RedundancyError(f"correctness has shape {scores.shape}; expected (models >= 2, samples >= 1)")
    n_models, n_samples = scores.shape
    grid = default_grid(n_samples) if n_grid is None else np.asarray(n_grid, dtype=int)
    if grid.min() < 1 or grid.max() > n_samples:
        raise RedundancyError(f"subset sizes must lie in 1..N={n_samples}")
    full = scores.mean(axis=1)
    rng = np.random.default_rng(seed)
    sums = np.empty((n_draws, grid.size, n_models))
    for draw in range(n_draws):
        cumulative = np.cumsum(scores[:, rng.permutation(n_samples)], axis=1)
        sums[draw] = cumulative[:, grid - 1].T
    subset_acc = sums / grid[None, :, None]
    return grid, kendall_tau(full, subset_acc, variant).mean(axis=0)


def sum_over_sizes(grid: np.ndarray, values: np.ndarray, n_samples: int) -> float:
    """Σ_{n=1..N} f(n) from f on a grid containing 1 and N: exact for the full grid, trapezoid in between."""
    if grid[0] != 1 or grid[-1] != n_samples:
        raise RedundancyError("the n-grid must start at 1 and end at N to sum over all subset sizes")
    return float(np.trapezoid(values, grid) + (values[0] + values[-1]) / 2)


def performance_redundancy(correctness: np.ndarray, **kwargs) -> float:
    """R(D) = (1/N) Σ_n τ_n (R7), with τ_n from ``redundancy_profile`` (same keyword arguments)."""
    n_samples = np.asarray(correctness).shape[1]
    grid, tau = redundancy_profile(correctness, **kwargs)
    return sum_over_sizes(grid, tau, n_samples) / n_samples


def performance_correlation(scores: pd.DataFrame) -> pd.DataFrame:
    """ρ_ij (R13): Pearson correlation of benchmarks' score vectors over the model panel (rows = models)."""
    if len(scores) < 3:
        raise RedundancyError(f"need at least 3 models to correlate benchmarks; the score table has {len(scores)}")
    return scores.corr(method="pearson")


def partial_correlation(scores: pd.DataFrame, reference: str = "MMLU") -> pd.DataFrame:
    """ρ_ij|u (R14): correlation with the reference benchmark u's "rising tide" removed; u itself is dropped."""
    if reference not in scores.columns:
        raise RedundancyError(f"reference benchmark {reference!r} is not in the score table; its columns are "
                              f"{list(scores.columns)}. Pass reference= one of them")
    rho = performance_correlation(scores)
    u = rho[reference].drop(reference)
    inner = rho.drop(index=reference, columns=reference)
    scale = np.sqrt(1 - u.to_numpy() ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (inner.to_numpy() - np.outer(u, u)) / np.outer(scale, scale)
    return pd.DataFrame(values, index=inner.index, columns=inner.columns)


@dataclass(frozen=True)
class PairCorrelation:
    """Agreement of two benchmark matrices over the unordered pairs they share (None below 3 pairs)."""

    pairs: int
    pearson: float | None
    spearman: float | None


def pair_correlations(x: pd.DataFrame, y: pd.DataFrame) -> PairCorrelation:
    """Pearson and Spearman between two symmetric benchmark matrices over all pairs i < j they share."""
    names = [name for name in x.index if name in y.index]
    i, j = np.triu_indices(len(names), k=1)
    a = x.loc[names, names].to_numpy()[i, j]
    b = y.loc[names, names].to_numpy()[i, j]
    if len(a) < 3:
        return PairCorrelation(len(a), None, None)
    return PairCorrelation(len(a), float(stats.pearsonr(a, b).statistic), float(stats.spearmanr(a, b).statistic))


# --------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Curve:
    """A function of the subset size n, sampled on a grid of n."""

    n: list[int]
    values: list[float]


@dataclass(frozen=True)
class BenchmarkRow:
    """One benchmark's footprint metrics, and R(D) when per-sample scores were given."""

    n_samples: int
    footprint_size: int
    """|F(D)| (R4)."""
    feature_redundancy: float
    """R̂(D) (R10)."""
    samples_for_90pct_coverage: int
    coverage: Curve
    """c_n (R8), exact."""
    performance_redundancy: float | None = None
    """R(D) (R7)."""
    tau_profile: Curve | None = None
    """τ_n (R6), Monte Carlo."""

    @classmethod
    def from_json(cls, data: Mapping) -> BenchmarkRow:
        tau = data.get("tau_profile")
        return cls(**{**data, "coverage": Curve(**data["coverage"]), "tau_profile": tau and Curve(**tau)})


@dataclass(frozen=True)
class Matrix:
    """A benchmark × benchmark table; undefined cells (NaN) are None, so that it is plain JSON."""

    names: list[str]
    values: list[list[float | None]]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Matrix:
        return cls(list(frame.index), [[_num(v) for v in row] for row in frame.to_numpy()])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values, index=self.names, columns=self.names, dtype=float)


@dataclass(frozen=True)
class RankCorrelation:
    benchmarks: list[str]
    rho: float


@dataclass(frozen=True)
class DropCandidate:
    benchmark: str
    covered_by: str
    overlap: float
    """The share of ``benchmark``'s footprint inside ``covered_by``'s."""


@dataclass(frozen=True)
class Distinct:
    benchmark: str
    max_overlap: float


@dataclass(frozen=True)
class Summary:
    """Which benchmarks another one covers (drop candidates) and which no other one covers (keep)."""

    drop_candidates: list[DropCandidate]
    distinct: list[Distinct]
    rule: str

    @classmethod
    def from_json(cls, data: Mapping) -> Summary:
        return cls([DropCandidate(**d) for d in data["drop_candidates"]], [Distinct(**d) for d in data["distinct"]],
                   data["rule"])


@dataclass(frozen=True)
class RedundancySettings:
    reference: str
    n_draws: int
    seed: int
    kendall_variant: KendallVariant
    drop_threshold: float
    distinct_threshold: float


@dataclass(frozen=True)
class RedundancyReport:
    """Every number of report §4 for a suite; ``write_report`` in ``recipes.reports`` renders it."""

    benchmarks: dict[str, BenchmarkRow]
    overlap: Matrix
    """overlap(D1, D2) (R11): row D1 covered by column D2."""
    overlap_min: Matrix
    """overlap_min (R12), symmetric."""
    settings: RedundancySettings
    summary: Summary
    spearman_r_vs_rhat: RankCorrelation | None = None
    """ρ(R, R̂) over the benchmarks with per-sample scores (at least 3)."""
    pearson: Matrix | None = None
    """ρ_ij (R13) of scores over the model panel."""
    partial_pearson: Matrix | None = None
    """ρ_ij|u (R14), given the reference benchmark."""
    overlap_min_vs_pearson: PairCorrelation | None = None
    overlap_min_vs_partial_pearson: PairCorrelation | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> RedundancyReport:
        def maybe(kind, value):
            return None if value is None else kind(**value)

        return cls({name: BenchmarkRow.from_json(row) for name, row in data["benchmarks"].items()},
                   Matrix(**data["overlap"]), Matrix(**data["overlap_min"]), RedundancySettings(**data["settings"]),
                   Summary.from_json(data["summary"]), maybe(RankCorrelation, data["spearman_r_vs_rhat"]),
                   maybe(Matrix, data["pearson"]), maybe(Matrix, data["partial_pearson"]),
                   maybe(PairCorrelation, data["overlap_min_vs_pearson"]),
                   maybe(PairCorrelation, data["overlap_min_vs_partial_pearson"]))


def redundancy_report(footprints: Mapping[str, LayerFootprints], *, scores: pd.DataFrame | None = None,
                      correctness: Mapping[str, np.ndarray] | None = None, reference: str = "MMLU",
                      n_draws: int = 200, seed: int = 0, variant: KendallVariant = "b",
                      drop_threshold: float = 0.6, distinct_threshold: float = 0.2,
                      coverage_points: int = 128) -> RedundancyReport:
    """Every number of report §4 for a suite of benchmarks.

    Args:
        footprints: ``{benchmark: LayerFootprints}``, all from the same SAE.
        scores: models × benchmarks accuracies (R13/R14); derived from ``correctness`` when omitted.
        correctness: ``{benchmark: (models, samples)}`` per-sample scores, for R(D) (R7).
        drop_threshold: D is a drop candidate when another benchmark covers ≥ this share of F(D) (R11).
        distinct_threshold: D is distinct (keep; out-of-distribution for the suite) when no other benchmark
            covers more than this share of F(D).
    """
    if not footprints:
        raise RedundancyError("no footprints given")
    widths = {fp.d_sae for fp in footprints.values()}
    if len(widths) > 1:
        raise RedundancyError(f"footprints come from SAEs of different widths {sorted(widths)}; compare "
                              "benchmarks only through the same SAE and layer")
    correctness = {name: np.asarray(c, dtype=float) for name, c in (correctness or {}).items()}
    for name, c in correctness.items():
        if name not in footprints:
            raise RedundancyError(f"correctness is given for {name!r}, which is not among the benchmarks "
                                  f"{list(footprints)}; name it as its footprints are named")
        if c.shape[-1] != len(footprints[name]):
            raise RedundancyError(f"correctness of {name!r} has {c.shape[-1]} samples but its footprints have "
                                  f"{len(footprints[name])}; they must describe the same samples")
    benchmarks = {}
    for name, fp in footprints.items():
        support, n_samples = fp.support(), len(fp)
        grid = default_grid(n_samples, coverage_points)
        perf = tau_profile = None
        if name in correctness:
            tau_grid, tau = redundancy_profile(correctness[name], n_draws=n_draws, seed=seed, variant=variant,
                                               n_grid=grid)
            perf = sum_over_sizes(tau_grid, tau, n_samples) / n_samples
            tau_profile = Curve(tau_grid.tolist(), tau.tolist())
        benchmarks[name] = BenchmarkRow(
            n_samples=n_samples, footprint_size=int((support > 0).sum()),
            feature_redundancy=feature_redundancy(support, n_samples),
            samples_for_90pct_coverage=samples_for_coverage(support, n_samples, 0.9),
            coverage=Curve(grid.tolist(), expected_coverage(support, n_samples, grid).tolist()),
            performance_redundancy=perf, tau_profile=tau_profile)
    overlap, overlap_min = overlaps({name: fp.features() for name, fp in footprints.items()})
    both = [name for name, row in benchmarks.items() if row.performance_redundancy is not None]
    spearman = None
    if len(both) >= 3:
        rho = stats.spearmanr([benchmarks[n].performance_redundancy for n in both],
                              [benchmarks[n].feature_redundancy for n in both]).statistic
        spearman = RankCorrelation(both, float(rho))
    if scores is None and correctness:
        scores = pd.DataFrame({name: c.mean(axis=1) for name, c in correctness.items()})
    pearson = partial = vs_pearson = vs_partial = None
    if scores is not None:
        rho = performance_correlation(scores)
        pearson, vs_pearson = Matrix.from_frame(rho), pair_correlations(overlap_min, rho)
        if reference in scores.columns:
            partial_rho = partial_correlation(scores, reference)
            partial, vs_partial = Matrix.from_frame(partial_rho), pair_correlations(overlap_min, partial_rho)
    settings = RedundancySettings(reference, n_draws, seed, variant, drop_threshold, distinct_threshold)
    return RedundancyReport(benchmarks, Matrix.from_frame(overlap), Matrix.from_frame(overlap_min), settings,
                            _summary(overlap, drop_threshold, distinct_threshold), spearman, pearson, partial,
                            vs_pearson, vs_partial)


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _summary(overlap: pd.DataFrame, drop_threshold: float, distinct_threshold: float) -> Summary:
    """When two benchmarks cover each other (a subset and its superset), only the more-covered one is a drop
    candidate: dropping both would lose what they share."""
    drop, keep = [], []
    for name in overlap.index:
        others = overlap.loc[name].drop(name)
        if others.empty:
            continue
        covering = [other for other in others.index if others[other] >= drop_threshold and
                    (others[other], other) > (overlap.loc[other, name], name)]
        if covering:
            best = max(covering, key=lambda other: others[other])
            drop.append(DropCandidate(name, best, float(others[best])))
        elif others.max() <= distinct_threshold:
            keep.append(Distinct(name, float(others.max())))
    return Summary(drop, keep, f"drop D if another benchmark D2 covers >= {drop_threshold:.0%} of F(D) and D covers "
                               f"less of F(D2) (overlap R11); keep D as distinct if none covers more than "
                               f"{distinct_threshold:.0%}")


def load_suite(paths: Sequence[str | Path], layer: int | None = None) -> tuple[int, dict[str, LayerFootprints]]:
    """``(layer, {benchmark: LayerFootprints})`` from footprint files, all at one layer they share.

    ``layer`` may be omitted when the files share exactly one layer; metrics across layers would compare
    different SAEs, so there is no default among several.
    """
    files = [Footprints.load(path) for path in paths]
    names = [fp.name for fp in files]
    if len(set(names)) < len(names):
        raise RedundancyError(f"benchmark names repeat ({names}); give each harvest its own name "
                              "(harvest_footprints name= or `qscope footprints --name`)")
    shared = sorted(set.intersection(*(set(fp.layers) for fp in files))) if files else []
    if layer is None:
        if len(shared) != 1:
            raise RedundancyError(f"the footprint files share layers {shared}; choose one of them (layer=, "
                                  "`qscope redundancy --layer`)" if shared else "the footprint files share no "
                                  "layer; harvest every benchmark at the same layer")
        layer = shared[0]
    elif layer not in shared:
        raise RedundancyError(f"layer {layer} is not in every footprint file; they share layers {shared}")
    return layer, {fp.name: fp[layer] for fp in files}


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV with models as rows (their names in the first column): accuracies or per-sample scores."""
    try:
        return pd.read_csv(path, index_col=0)
    except (OSError, ValueError) as e:
        raise RedundancyError(f"cannot read CSV {str(path)!r} ({e}); expected models as rows, the first column "
                              "their names") from None


def read_correctness(paths: Mapping[str, str | Path]) -> dict[str, np.ndarray]:
    """``{benchmark: (models, samples)}`` per-sample scores from one CSV per benchmark (see ``read_table``)."""
    out = {}
    for name, path in paths.items():
        table = read_table(path)
        try:
            out[name] = table.to_numpy(dtype=float)
        except ValueError as e:
            raise RedundancyError(f"{str(path)!r} holds non-numeric scores ({e}); expected one number per model "
                                  "and sample, e.g. 0/1 correctness") from None
    return out
