"""The interval maths of ``snclr compare`` on synthetic numbers with known answers."""

import math

import pytest

from snclr.training.compare_report import CellResult, summarize
from snclr.training.stats import mean_std, paired_interval, t_quantile, t_two_sided_mass, verdict

# Student t quantiles from the standard tables (df, p, t_p).
T_TABLE = [
    (1, 0.975, 12.7062), (2, 0.975, 4.3027), (3, 0.975, 3.1824), (4, 0.975, 2.7764),
    (5, 0.975, 2.5706), (10, 0.975, 2.2281), (30, 0.975, 2.0423), (2, 0.995, 9.9248),
    (4, 0.9875, 3.4954), (9, 0.95, 1.8331),
]


@pytest.mark.parametrize("df, p, expected", T_TABLE, ids=[f"df{d}-p{p}" for d, p, _ in T_TABLE])
def test_t_quantile_matches_the_tables(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-4)
    assert t_two_sided_mass(t_quantile(p, df), df) == pytest.approx(2 * p - 1, abs=1e-12)


def test_t_tends_to_the_normal_and_rejects_bad_arguments():
    assert t_quantile(0.975, 2000) == pytest.approx(1.9600, abs=2e-3)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        t_quantile(1.0, 3)


def test_mean_and_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert mean_std([0.7]) == (0.7, None)


def test_paired_interval_by_hand():
    # d = (1, 2, 3): mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 2.4841.
    interval = paired_interval([1.5, 2.5, 3.5], [0.5, 0.5, 0.5])
    assert (interval.mean, interval.std, interval.n) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    assert interval.low == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-6)
    assert interval.high == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-6)
    assert verdict(interval) == "within noise"
    wider = paired_interval([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], level=0.99)
    assert wider.low < interval.low and wider.high > interval.high


def test_pairing_by_seed_is_what_separates_a_consistent_gain_from_noise():
    # The seeds move both variants together; the gain is +0.01 on every seed.
    base = [0.80, 0.85, 0.90]
    better = paired_interval([0.811, 0.859, 0.912], base)
    assert verdict(better) == "better" and better.low > 0
    # The same numbers unpaired (baseline seeds shuffled) are within the noise.
    assert verdict(paired_interval([0.811, 0.859, 0.912], [0.90, 0.80, 0.85])) == "within noise"
    assert verdict(paired_interval(base, [0.811, 0.859, 0.912])) == "worse"
    assert verdict(paired_interval([0.9], [0.8])) == "one seed"
    with pytest.raises(ValueError, match="one baseline value per value"):
        paired_interval([0.9, 0.8], [0.8])


def _cells(variant, values):
    return [CellResult(variant=variant, method=variant, seed=s, folder=f"{variant}/{s}",
                       status="done", metrics={"knn_k20": v, "knn_k200": v, "linear": v},
                       linear_protocol="cached", pretrain_s=10.0, eval_s=2.0)
            for s, v in enumerate(values)]


def test_summary_rows_verdicts_and_the_bonferroni_correction():
    cells = (_cells("base", [0.80, 0.85, 0.90]) + _cells("gain", [0.812, 0.858, 0.911])
             + _cells("loss", [0.70, 0.86, 0.85]) + _cells("edge", [0.81, 0.864, 0.918]))
    rows = summarize(cells, variants=["base", "gain", "loss", "edge"], baseline="base")
    assert [r.variant for r in rows] == ["base", "gain", "loss", "edge"]
    base, gain, loss, edge = rows
    assert base.diff == {} and base.verdict == "" and base.wall_s == pytest.approx(12.0)
    assert base.mean["knn_k20"] == pytest.approx(0.85)
    assert base.std["knn_k20"] == pytest.approx(0.05)
    assert gain.diff["knn_k20"].mean == pytest.approx(0.0103333, abs=1e-6)
    assert (gain.verdict, gain.verdict_corrected) == ("better", "better")
    assert loss.verdict == "within noise"
    # d = (0.010, 0.014, 0.018): mean / standard error = 6.06, between t(0.975, 2) = 4.30
    # and t(1 - 0.05 / 6, 2) = 7.65: the 95 % interval excludes 0, the 98.33 % one (three
    # comparisons, Bonferroni) does not.
    assert (edge.verdict, edge.verdict_corrected) == ("better", "within noise")
    assert edge.diff["knn_k20"].low == pytest.approx(
        0.014 - t_quantile(0.975, 2) * 0.004 / math.sqrt(3), abs=1e-9)
    mass = 1 - 0.05 / 3  # df = 2 in closed form: t = a sqrt(2 / (1 - a^2)), a the mass
    assert t_quantile(1 - 0.05 / 6, 2) == pytest.approx(mass * math.sqrt(2 / (1 - mass**2)))


def test_summary_pairs_only_the_seeds_both_finished():
    cells = _cells("base", [0.80, 0.85, 0.90]) + _cells("other", [0.81, 0.86, 0.95])
    cells[4] = CellResult(**{**cells[4].__dict__, "status": "diverged", "metrics": {}})
    rows = summarize(cells, variants=["base", "other"], baseline="base")
    assert rows[1].seeds == [0, 2] and rows[1].diverged == [1]
    assert rows[1].diff["knn_k20"].n == 2
    assert rows[1].diff["knn_k20"].mean == pytest.approx((0.01 + 0.05) / 2)
