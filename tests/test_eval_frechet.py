"""The Fréchet distance against scipy's sqrtm formula and torchaudio's formula, on well-conditioned and
near-singular covariances; FAD-inf and saved statistics.

torchaudio cannot be installed next to torch 2.13's CPU wheel (its PyPI wheels are CUDA builds), so its
`functional.frechet_distance` is transcribed here (torchaudio 2.11.1): |mu_x - mu_y|² + Tr(S_x) + Tr(S_y)
- 2 Σ Re sqrt(eigvals(S_x S_y)). tests/data/eval_oracles.py's run compared the two directly."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from musicgen.eval import frechet


def torchaudio_frechet(mu_x, sigma_x, mu_y, sigma_y) -> float:
    mu_x, sigma_x, mu_y, sigma_y = (torch.from_numpy(np.asarray(a)) for a in (mu_x, sigma_x, mu_y, sigma_y))
    a = (mu_x - mu_y).square().sum()
    b = sigma_x.trace() + sigma_y.trace()
    c = torch.linalg.eigvals(sigma_x @ sigma_y).sqrt().real.sum()
    return float(a + b - 2 * c)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def sets(n: int, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)) @ (np.eye(d) + 0.1 * rng.standard_normal((d, d)))
    b = rng.standard_normal((n, d)) @ (np.eye(d) + 0.1 * rng.standard_normal((d, d))) * 1.2 + 0.1
    return frechet.fit(a), frechet.fit(b), a, b


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_scipy_and_torchaudio_on_well_conditioned(seed):
    ga, gb, a, _ = sets(2000, seed=seed)
    assert np.linalg.cond(ga.sigma) < 1e4
    ours = frechet.frechet_distance(ga, gb)
    assert ours == pytest.approx(scipy_frechet(ga.mu, ga.sigma, gb.mu, gb.sigma), rel=1e-6)
    assert ours == pytest.approx(torchaudio_frechet(ga.mu, ga.sigma, gb.mu, gb.sigma), rel=1e-6)
    assert ga.mu == pytest.approx(a.mean(0)) and np.allclose(ga.sigma, np.cov(a, rowvar=False))


def test_near_singular_fewer_examples_than_dimensions():
    """5 examples in 128 dimensions: rank-4 covariances. With S_b = 4 S_a the answer is known exactly:
    Tr((S_a S_b)^½) = 2 Tr(S_a), so d² = |Δmu|² + Tr(S_a) + 4 Tr(S_a) - 4 Tr(S_a)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 128))
    ga = frechet.fit(x)
    gb = frechet.Gaussian(ga.mu + 0.5, 4 * ga.sigma, 5)
    expected = 128 * 0.25 + np.trace(ga.sigma)
    got = frechet.frechet_distance(ga, gb)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-9)
    assert abs(frechet.frechet_distance(ga, ga)) < 1e-9 * np.trace(ga.sigma)
    ga2, gb2, _, _ = sets(5, d=128)
    got2 = frechet.frechet_distance(ga2, gb2)
    assert np.isfinite(got2) and got2 > 0
    assert got2 == pytest.approx(torchaudio_frechet(ga2.mu, ga2.sigma, gb2.mu, gb2.sigma), rel=1e-6)


def test_symmetric_and_input_checks():
    ga, gb, _, _ = sets(300)
    assert frechet.frechet_distance(ga, gb) == pytest.approx(frechet.frechet_distance(gb, ga), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet.fit(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="different sizes"):
        frechet.frechet_distance(ga, frechet.fit(np.random.default_rng(0).standard_normal((10, 3))))


def test_fad_inf_follows_fadtk_step_by_step():
    ga, _, a, b = sets(400)
    got = frechet.fad_inf(b, ga, steps=5, min_n=100, seed=3)
    rng = np.random.default_rng(3)
    ns = [int(n) for n in np.linspace(100, 400, 5)]
    ys = [frechet.frechet_distance(frechet.fit(b[rng.integers(0, 400, size=n)]), ga) for n in ns]
    slope, intercept = np.polyfit(1 / np.array(ns), ys, 1)
    assert got.value == pytest.approx(intercept) and got.slope == pytest.approx(slope)
    assert [p[0] for p in got.points] == ns and 0 <= got.r2 <= 1
    # the same set against itself: FAD falls towards 0 as n grows, and FAD-inf extrapolates below every point
    self_inf = frechet.fad_inf(a, ga, steps=8, min_n=50)
    assert self_inf.value < min(p[1] for p in self_inf.points)


def test_stats_round_trip(tmp_path):
    ga, _, _, _ = sets(50)
    frechet.save_stats(tmp_path / "ref.npz", {"vggish": ga}, {"embedders": {"vggish": "abc"}})
    stats, settings = frechet.load_stats(tmp_path / "ref.npz")
    assert settings == {"embedders": {"vggish": "abc"}} and stats["vggish"].count == 50
    assert np.array_equal(stats["vggish"].sigma, ga.sigma) and np.array_equal(stats["vggish"].mu, ga.mu)
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(ValueError, match="cannot read reference statistics"):
        frechet.load_stats(tmp_path / "bad.npz")
