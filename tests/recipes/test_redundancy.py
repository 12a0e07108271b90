"""Redundancy metrics (report §4) against brute force, Monte Carlo and scipy."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from qscope_plugin.recipes.footprints import LayerFootprints
from qscope_plugin.recipes.redundancy import (
    RedundancyError,
    RedundancyReport,
    expected_coverage,
    feature_redundancy,
    kendall_tau,
    overlaps,
    pair_correlations,
    partial_correlation,
    performance_correlation,
    performance_redundancy,
    redundancy_profile,
    redundancy_report,
    samples_for_coverage,
)
from qscope_plugin.recipes.reports import write_report


def footprints_of(sets: list[set[int]], d_sae: int = 32) -> LayerFootprints:
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    indices = np.array([f for s in sets for f in sorted(s)], dtype=np.int32)
    return LayerFootprints(indptr, indices, d_sae)


def brute_coverage(sets: list[set[int]], n: int) -> Fraction:
    """E|F(S)| / |F(D)| over every n-subset, in exact rational arithmetic."""
    total = set().union(*sets)
    subsets = list(itertools.combinations(sets, n))
    return Fraction(sum(len(set().union(*s)) for s in subsets), len(subsets) * len(total))


random_footprints = st.lists(st.sets(st.integers(0, 11), max_size=6), min_size=1, max_size=9).filter(
    lambda sets: any(sets))


@settings(max_examples=60, deadline=None)
@given(random_footprints)
def test_exact_coverage_equals_enumeration_of_all_subsets(sets):
    fp = footprints_of(sets, d_sae=12)
    exact = expected_coverage(fp.support(), len(fp))
    brute = [float(brute_coverage(sets, n)) for n in range(1, len(sets) + 1)]
    np.testing.assert_allclose(exact, brute, rtol=0, atol=1e-12)
    # R̂ closed form (R10a) = Σ_n c_n / |F(D)| (R10)
    assert feature_redundancy(fp.support(), len(fp)) == pytest.approx(sum(brute) / len(fp.features()), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=40).filter(any), st.integers(0, 200))
def test_coverage_is_monotone_and_complete(support, extra):
    n_samples = max(support) + extra
    support = np.array(support)
    c = expected_coverage(support, n_samples)
    assert c[-1] == pytest.approx(1.0, abs=1e-12)  # c_N = 1
    assert np.all(np.diff(c) >= -1e-12)  # non-decreasing
    assert np.all((c > 0) & (c <= 1 + 1e-12))


def test_coverage_matches_monte_carlo_for_larger_benchmarks():
    rng = np.random.default_rng(0)
    n_samples, n_features, n_draws = 2000, 3000, 400
    popularity = rng.pareto(1.5, n_features) + 0.2
    fires = rng.random((n_samples, n_features)) < np.minimum(popularity / popularity.sum() * 40, 1)
    fires = fires[:, fires.any(0)]
    support = fires.sum(0)
    for n in (5, 50, 500):
        draws = [fires[rng.choice(n_samples, n, replace=False)].any(0).mean() for _ in range(n_draws)]
        mean, se = np.mean(draws), np.std(draws, ddof=1) / np.sqrt(n_draws)
        exact = expected_coverage(support, n_samples, [n])[0]
        assert abs(exact - mean) < 4 * se + 1e-9, (n, exact, mean, se)


def test_coverage_bad_input_is_one_clear_error():
    with pytest.raises(RedundancyError, match="empty"):
        expected_coverage(np.zeros(5, int), 10)
    with pytest.raises(RedundancyError, match="1..N=10"):
        expected_coverage(np.array([1, 2]), 10, [11])
    with pytest.raises(RedundancyError, match="0..N=3"):
        feature_redundancy(np.array([4]), 3)


def test_samples_for_coverage_is_the_first_n_reaching_the_target():
    rng = np.random.default_rng(1)
    support = rng.integers(1, 50, 300)
    c = expected_coverage(support, 200)
    n = samples_for_coverage(support, 200, 0.9)
    assert c[n - 1] >= 0.9 > c[n - 2]


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 9).flatmap(lambda m: st.tuples(
    st.lists(st.integers(0, 4), min_size=m, max_size=m), st.lists(st.integers(0, 4), min_size=m, max_size=m))))
def test_kendall_tau_b_equals_scipy_and_tau_a_equals_pair_count(xy):
    x, y = (np.array(v, dtype=float) for v in xy)
    ours = kendall_tau(x, y[None], "b")[0]
    ref = stats.kendalltau(x, y, variant="b").statistic
    assert ours == (0.0 if np.isnan(ref) else pytest.approx(ref, abs=1e-12))
    pairs = list(itertools.combinations(range(len(x)), 2))
    tau_a = sum(np.sign(x[j] - x[i]) * np.sign(y[j] - y[i]) for i, j in pairs) / len(pairs)
    assert kendall_tau(x, y, "a") == pytest.approx(tau_a, abs=1e-12)


def test_redundancy_profile_matches_exhaustive_expectation():
    rng = np.random.default_rng(3)
    correctness = (rng.random((6, 9)) < np.linspace(0.2, 0.8, 6)[:, None]).astype(float)
    full = correctness.mean(1)
    grid, tau = redundancy_profile(correctness, n_draws=3000, seed=0)
    assert tau[-1] == pytest.approx(1.0)  # τ_N = 1
    for n in (1, 3, 6):
        subsets = itertools.combinations(range(9), n)
        exact = np.mean([kendall_tau(full, correctness[:, list(s)].mean(1)[None])[0] for s in subsets])
        assert tau[n - 1] == pytest.approx(exact, abs=0.03)
    r = performance_redundancy(correctness, n_draws=3000, seed=0)
    assert r == pytest.approx(tau.mean(), abs=1e-12)  # the full grid sums exactly
    assert performance_redundancy(correctness, n_draws=50, seed=7) == performance_redundancy(
        correctness, n_draws=50, seed=7)


def test_overlaps_are_intersections_over_footprint_sizes():
    overlap, overlap_min = overlaps({"gsm8k": np.array([1, 2, 3, 4]), "math": np.arange(1, 41)})
    assert overlap.loc["gsm8k", "math"] == 1.0 and overlap.loc["math", "gsm8k"] == 0.1
    assert overlap_min.loc["gsm8k", "math"] == overlap_min.loc["math", "gsm8k"] == 1.0


def score_table(seed: int = 0, models: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    tide = rng.normal(size=models)
    return pd.DataFrame({name: tide * w + rng.normal(scale=0.5, size=models)
                         for name, w in (("MMLU", 1.0), ("GSM8K", 0.8), ("MATH", 0.9), ("MBPP", 0.3),
                                         ("EvalPlus", 0.4))})


def test_correlations_equal_scipy_and_regression_residuals():
    scores = score_table()
    rho = performance_correlation(scores)
    assert rho.loc["GSM8K", "MATH"] == pytest.approx(stats.pearsonr(scores["GSM8K"], scores["MATH"]).statistic)
    partial = partial_correlation(scores, "MMLU")
    assert "MMLU" not in partial.columns
    u = np.column_stack([np.ones(len(scores)), scores["MMLU"]])

    def residual(name: str) -> np.ndarray:
        coef, *_ = np.linalg.lstsq(u, scores[name], rcond=None)
        return scores[name] - u @ coef

    for a, b in itertools.combinations(partial.columns, 2):
        assert partial.loc[a, b] == pytest.approx(stats.pearsonr(residual(a), residual(b)).statistic, abs=1e-10)
    with pytest.raises(RedundancyError, match="reference benchmark 'HumanEval'"):
        partial_correlation(scores, "HumanEval")


def test_pair_correlations_use_each_unordered_pair_once():
    names = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    x = rng.random((4, 4))
    y = rng.random((4, 4))
    x, y = (pd.DataFrame((m + m.T) / 2, index=names, columns=names) for m in (x, y))
    i, j = np.triu_indices(4, 1)
    out = pair_correlations(x, y)
    assert out.pairs == 6
    assert out.pearson == pytest.approx(stats.pearsonr(x.to_numpy()[i, j], y.to_numpy()[i, j]).statistic)
    assert out.spearman == pytest.approx(stats.spearmanr(x.to_numpy()[i, j], y.to_numpy()[i, j]).statistic)


def test_report_on_a_planted_suite(tmp_path):
    """GSM8K's features are a subset of MATH's (the report's 0.63 / 0.10 asymmetry); CODE shares nothing."""
    rng = np.random.default_rng(0)

    def bench(pool: np.ndarray, n: int) -> LayerFootprints:
        return footprints_of([set(rng.choice(pool, 6, replace=False).tolist()) for _ in range(n)], d_sae=400)

    fps = {"GSM8K": bench(np.arange(0, 20), 60), "MATH": bench(np.arange(0, 200), 80),
           "CODE": bench(np.arange(300, 400), 50), "MMLU": bench(np.arange(100, 300), 70)}
    panel = 10
    ability = np.linspace(0.2, 0.8, panel)
    correctness = {name: (rng.random((panel, len(fp))) < ability[:, None]).astype(float) for name, fp in fps.items()}
    report = redundancy_report(fps, correctness=correctness, n_draws=100)
    overlap = report.overlap.to_frame()
    gsm_set, math_set = set(fps["GSM8K"].features()), set(fps["MATH"].features())
    assert overlap.loc["GSM8K", "MATH"] == len(gsm_set & math_set) / len(gsm_set) > 0.9
    assert overlap.loc["MATH", "GSM8K"] == len(gsm_set & math_set) / len(math_set) < 0.2
    (drop,) = report.summary.drop_candidates
    assert drop.benchmark == "GSM8K" and drop.covered_by == "MATH"
    assert {d.benchmark for d in report.summary.distinct} == {"CODE"}
    gsm = report.benchmarks["GSM8K"]
    assert gsm.feature_redundancy == pytest.approx(feature_redundancy(fps["GSM8K"].support(), 60))
    assert gsm.footprint_size == len(fps["GSM8K"].features())
    assert gsm.coverage.values == pytest.approx(expected_coverage(fps["GSM8K"].support(), 60, gsm.coverage.n))
    assert 0 < gsm.performance_redundancy <= 1 and gsm.tau_profile.values[-1] == pytest.approx(1.0)
    assert set(report.spearman_r_vs_rhat.benchmarks) == set(fps)
    assert report.partial_pearson.names == ["GSM8K", "MATH", "CODE"]
    assert report.overlap_min_vs_partial_pearson.pairs == 3
    files = write_report(report, tmp_path)
    assert [f.name for f in files] == ["report.json", "report.md", "overlap.png", "coverage.png"]
    assert json.loads((tmp_path / "report.json").read_text())["benchmarks"]["MATH"]["n_samples"] == 80
    assert (tmp_path / "overlap.png").stat().st_size > 0 and (tmp_path / "coverage.png").stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "drop candidate: **GSM8K**" in md and "partial ρ given MMLU (R14)" in md
    # report.json reads back to an equal report, which renders the same markdown
    again = RedundancyReport.from_json(json.loads((tmp_path / "report.json").read_text()))
    assert again == report
    write_report(again, tmp_path / "again")
    assert (tmp_path / "again" / "report.md").read_text() == md


def test_report_without_scores_round_trips_its_missing_parts():
    fps = {"a": footprints_of([{1, 2}, {2, 3}]), "b": footprints_of([{1}, {2}, {5}])}
    report = redundancy_report(fps)
    assert report.pearson is None and report.spearman_r_vs_rhat is None
    assert report.benchmarks["a"].performance_redundancy is None and report.benchmarks["a"].tau_profile is None
    data = json.loads(json.dumps(report.to_json()))
    assert RedundancyReport.from_json(data) == report
    assert RedundancyReport.from_json({**data, "summary": {**data["summary"], "rule": "other"}}) != report


def test_report_refuses_mismatched_inputs():
    fp = footprints_of([{1}, {2}], d_sae=8)
    with pytest.raises(RedundancyError, match="different widths"):
        redundancy_report({"a": fp, "b": footprints_of([{1}], d_sae=16)})
    with pytest.raises(RedundancyError, match="3 samples but its footprints have 2"):
        redundancy_report({"a": fp}, correctness={"a": np.ones((4, 3))})


def _footprint_file(path, name: str, layers: tuple[int, ...], n: int = 3):
    from qscope_plugin.recipes.footprints import Footprints

    layer_fps = {layer: LayerFootprints(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int32), 16)
                 for layer in layers}
    Footprints(layer_fps, {"benchmark": name}).save(path)
    return str(path)


def test_load_suite_chooses_the_one_shared_layer_and_refuses_to_guess(tmp_path):
    from qscope_plugin.recipes.redundancy import load_suite

    a = _footprint_file(tmp_path / "a.safetensors", "A", (3, 5))
    b = _footprint_file(tmp_path / "b.safetensors", "B", (5, 7))
    c = _footprint_file(tmp_path / "c.safetensors", "C", (3, 5, 7))
    layer, suite = load_suite([a, b])
    assert layer == 5 and list(suite) == ["A", "B"] and len(suite["A"]) == 3
    assert load_suite([a, c], 3)[0] == 3
    with pytest.raises(RedundancyError, match=r"share layers \[3, 5\]; choose one"):
        load_suite([a, c])
    with pytest.raises(RedundancyError, match=r"layer 7 is not in every footprint file; they share layers \[5\]"):
        load_suite([a, b], 7)
    with pytest.raises(RedundancyError, match="share no layer"):
        load_suite([_footprint_file(tmp_path / "d.safetensors", "D", (1,)), b])
    with pytest.raises(RedundancyError, match="names repeat"):
        load_suite([a, _footprint_file(tmp_path / "a2.safetensors", "A", (5,))])


def test_read_correctness_and_unknown_benchmarks(tmp_path):
    from qscope_plugin.recipes.redundancy import read_correctness, read_table

    pd.DataFrame([[1, 0, 1], [0, 0, 1]], index=["m1", "m2"]).to_csv(tmp_path / "a.csv")
    pd.DataFrame([["x", "y"]], index=["m1"]).to_csv(tmp_path / "bad.csv")
    assert read_correctness({"A": tmp_path / "a.csv"})["A"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    with pytest.raises(RedundancyError, match="non-numeric scores"):
        read_correctness({"A": tmp_path / "bad.csv"})
    with pytest.raises(RedundancyError, match="cannot read CSV"):
        read_table(tmp_path / "missing.csv")
    lf = LayerFootprints(np.arange(4, dtype=np.int64), np.arange(3, dtype=np.int32), 16)
    with pytest.raises(RedundancyError, match="'B', which is not among the benchmarks"):
        redundancy_report({"A": lf}, correctness={"B": np.ones((2, 3))})
