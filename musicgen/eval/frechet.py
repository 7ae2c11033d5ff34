"""The Fréchet distance between two Gaussians fitted to embeddings, and what fadtk builds on it.

    d² = |mu_a - mu_b|² + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^½)

Tr((S_a S_b)^½) is the sum of the square roots of the eigenvalues of S_a S_b. Those equal the eigenvalues of
the symmetric M = S_a^½ S_b S_a^½, which `eigh` finds without the complex round-off that scipy's `sqrtm` of
the non-symmetric product shows when a covariance is near-singular (fewer examples than dimensions). Eigenvalues
within round-off of zero (below d * eps * the largest) are taken as zero: a covariance has no negative ones, and
the square root would otherwise lift round-off of 1e-16 to 1e-8 in every null direction. All of it in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Gaussian:
    """Mean and covariance of a set of embeddings (float64), with the number of examples behind them."""
    mu: np.ndarray       # (D,)
    sigma: np.ndarray    # (D, D)
    count: int


def fit(embeddings: np.ndarray) -> Gaussian:
    """(N, D) embeddings -> their Gaussian; the covariance is the unbiased one (N - 1), as numpy's np.cov."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 embeddings, got {x.shape[0] if x.ndim else 0}")
    return Gaussian(x.mean(axis=0), np.cov(x, rowvar=False), x.shape[0])


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    floor = w.shape[0] * np.finfo(np.float64).eps * float(np.abs(w).max())
    return np.where(w > floor, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """Fréchet distance (the squared Wasserstein-2 distance) between two Gaussians."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"embeddings of different sizes: {a.mu.shape[0]} and {b.mu.shape[0]}")
    root_a = _sqrt_psd(a.sigma)
    m = root_a @ b.sigma @ root_a
    trace_sqrt = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt)


@dataclass
class FadInf:
    """fadtk's FAD∞: the intercept of FAD against 1/n over subsets of n embeddings."""
    value: float
    slope: float
    r2: float
    points: list[tuple[int, float]]


def fad_inf(embeddings: np.ndarray, reference: Gaussian, steps: int = 25, min_n: int = 500,
            seed: int = 0) -> FadInf:
    """FAD∞ as fadtk's `score_inf`: for `steps` sizes n from min_n to N, the FAD of n embeddings drawn with
    replacement; a line fitted against 1/n; its value at 1/n = 0. fadtk draws unseeded; here `seed` fixes the
    draws, and min_n is lowered to N // 2 when there are fewer than 2 * min_n embeddings."""
    x = np.asarray(embeddings, dtype=np.float64)
    n_max = x.shape[0]
    if n_max < 4:
        raise ValueError(f"FAD-inf needs at least 4 embeddings, got {n_max}")
    lo = min(min_n, n_max // 2)
    sizes = [int(n) for n in np.linspace(lo, n_max, steps)]
    rng = np.random.default_rng(seed)
    points = [(n, frechet_distance(fit(x[rng.integers(0, n_max, size=n)]), reference)) for n in sizes]
    xs = 1.0 / np.array(sizes, dtype=np.float64)
    ys = np.array([p[1] for p in points])
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = np.sum((ys - (slope * xs + intercept)) ** 2)
    spread = np.sum((ys - ys.mean()) ** 2)
    r2 = 1.0 - residual / spread if spread > 0 else 1.0
    return FadInf(float(intercept), float(slope), float(r2), points)


def save_stats(path, stats: dict[str, Gaussian], settings: dict) -> None:
    """Reference statistics per embedder, with the settings they were computed under (np.savez, atomic)."""
    import json

    from ..files import write_atomically

    arrays = {"settings": np.array(json.dumps(settings, sort_keys=True))}
    for name, g in stats.items():
        arrays[f"{name}.mu"], arrays[f"{name}.sigma"], arrays[f"{name}.count"] = g.mu, g.sigma, np.array(g.count)
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")   # tmp ends in .npz: savez adds none


def load_stats(path) -> tuple[dict[str, Gaussian], dict]:
    """The statistics and settings written by save_stats."""
    import json

    try:
        with np.load(path, allow_pickle=False) as data:
            settings = json.loads(str(data["settings"]))
            names = sorted({k.rsplit(".", 1)[0] for k in data.files if k != "settings"})
            stats = {n: Gaussian(data[f"{n}.mu"], data[f"{n}.sigma"], int(data[f"{n}.count"])) for n in names}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot read reference statistics {path}: {e}") from None
    return stats, settings
