"""Lloyd-Max codebooks for one coordinate of a randomly rotated unit vector.

After a Haar rotation, each coordinate x of a unit vector in R^d has the density
(Lemma 1 of the TurboQuant paper)

    f(x) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - x^2)^((d-3)/2),   x in [-1, 1],

that is, x^2 ~ Beta(1/2, (d-1)/2). The codebook is the Lloyd-Max quantizer of that density
(the continuous 1-D k-means): 2^b centroids, each the conditional mean of its cell, with cell
edges at the midpoints between neighbouring centroids. It is solved for the actual d, not for the
Gaussian limit N(0, 1/d).

All integrals are closed form: cell masses through the regularized incomplete beta function and
first moments through (1 - x^2)^((d-1)/2), evaluated in log space so that d up to 4096 is safe.
Codebooks are cached in memory and on disk (``$TQ_CACHE_DIR/codebooks``, default
``~/.cache/tq``). A file read from the disk cache is used only if it verifies: its checksum, its
name's d and b, and the invariants of the solution (2^b strictly increasing centroids inside
(-1, 1), exact symmetry, each positive centroid the conditional mean of its cell, the stored
distortion equal to the one recomputed from the centroids). One that does not is solved again and
rewritten, with a :class:`tq.core.fileio.CacheWarning` naming the file.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import solve_banded
from scipy.special import betaincc, betaincinv, gammaln

from tq.core.fileio import read_cache_json, write_checked_json

MIN_DIM = 2
MAX_DIM = 4096
MIN_BITS = 1
MAX_BITS = 8
_FORMAT = "tq.codebook/2"
_TOLERANCE = 1e-13
_MAX_ITERATIONS = 200
# A cached codebook is a solution if each positive centroid is within this of its cell's
# conditional mean (the solver stops at 1e-13 and takes one more Lloyd step: residuals measured
# over d in 2..4096, b in 1..8 are at most 5e-14), and its distortion within this of the one
# recomputed from its centroids (the solver computes it the same way: the difference measured is 0).
_FIXED_POINT_TOLERANCE = 1e-10
_DISTORTION_TOLERANCE = 1e-12


@dataclass(frozen=True, eq=False)
class Codebook:
    """A symmetric Lloyd-Max codebook for one rotated coordinate.

    Attributes:
        dim: vector dimension d the density belongs to.
        bits: bits per coordinate b.
        centroids: float64 [2^b], increasing, in [-1, 1].
        edges: float64 [2^b - 1], the interior cell boundaries (midpoints), increasing.
        distortion: expected squared error ||x - x~||^2 of a whole unit vector quantized with
            this codebook after a Haar rotation (the paper's D_mse), dimensionless.
        iterations: Lloyd iterations the solve took (0 when read from the disk cache).
    """

    dim: int
    bits: int
    centroids: np.ndarray
    edges: np.ndarray
    distortion: float
    iterations: int


def check_dim_bits(dim: int, bits: int) -> None:
    """Raise ValueError unless ``dim`` and ``bits`` are integers in the supported ranges."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be an integer, got {type(dim).__name__}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an integer, got {type(bits).__name__}")
    if not MIN_DIM <= dim <= MAX_DIM:
        raise ValueError(f"dim must be in [{MIN_DIM}, {MAX_DIM}], got {dim}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def coordinate_density(x: np.ndarray, dim: int) -> np.ndarray:
    """The density f(x) of one coordinate of a uniformly random unit vector in R^dim."""
    x = np.asarray(x, dtype=np.float64)
    log_c = gammaln(dim / 2) - gammaln((dim - 1) / 2) - 0.5 * np.log(np.pi)
    inside = np.abs(x) < 1
    density = np.zeros_like(x)
    density[inside] = np.exp(log_c + (dim - 3) / 2 * np.log1p(-(x[inside] ** 2)))
    return density


def _upper_tail(x: np.ndarray, dim: int) -> np.ndarray:
    """P(X > x) for x >= 0, accurate in the far tail (x^2 ~ Beta(1/2, (d-1)/2))."""
    return 0.5 * betaincc(0.5, (dim - 1) / 2, x * x)


def _first_moment_above(x: np.ndarray, dim: int) -> np.ndarray:
    """Integral of t f(t) over [x, 1] for x >= 0, in closed form."""
    log_c = gammaln(dim / 2) - gammaln((dim - 1) / 2) - 0.5 * np.log(np.pi)
    with np.errstate(divide="ignore"):
        log_tail = (dim - 1) / 2 * np.log1p(-np.minimum(x * x, 1.0))
    return np.exp(log_c - np.log(dim - 1) + log_tail)


def _cell_moments(edges: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Masses m_i and first moments F_i (integral of t f(t)) of the cells [edges[i], edges[i+1]]
    on [0, 1]."""
    tail = _upper_tail(edges, dim)
    moment = _first_moment_above(edges, dim)
    return tail[:-1] - tail[1:], moment[:-1] - moment[1:]


def _half_edges(half: np.ndarray) -> np.ndarray:
    """Cell edges on [0, 1] of the positive centroids ``half``: 0, the midpoints, 1."""
    return np.concatenate([[0.0], 0.5 * (half[:-1] + half[1:]), [1.0]])


def _half_centroids(edges: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Conditional means and masses of the cells [edges[i], edges[i+1]] on [0, 1]."""
    mass, first = _cell_moments(edges, dim)
    midpoint = 0.5 * (edges[:-1] + edges[1:])
    safe = mass > 0
    centroid = np.where(safe, first / np.where(safe, mass, 1.0), midpoint)
    return centroid, mass


def _distortion(half: np.ndarray, dim: int) -> float:
    """D_mse of the symmetric codebook whose positive centroids are ``half`` (increasing, in
    (0, 1)), each coordinate rounded to its nearest centroid: d E[(x - q(x))^2] with
    E[x^2] = 1/d, that is 1 - 2 d sum_i (2 c_i F_i - m_i c_i^2) over the positive cells (both
    halves count). At a Lloyd fixed point (c_i = F_i / m_i) it is 1 - 2 d sum_i m_i c_i^2."""
    mass, first = _cell_moments(_half_edges(half), dim)
    return float(1.0 - 2.0 * dim * np.sum(2.0 * half * first - mass * half * half))


def _full_edges(centroids: np.ndarray) -> np.ndarray:
    """Interior cell edges [2^b - 1] of a symmetric codebook: the midpoints, the middle one 0."""
    edges = 0.5 * (centroids[:-1] + centroids[1:])
    edges[centroids.size // 2 - 1] = 0.0
    return edges


def _initial_half_centroids(dim: int, levels: int) -> np.ndarray:
    """Panter-Dite start: quantiles of the positive half of f^(1/3), normalized.

    f^(1/3) is in the same family as f with dimension (d + 6) / 3, so its quantiles come from
    the inverse incomplete beta function.
    """
    dim_cubic = (dim + 6) / 3
    levels_p = (np.arange(levels) + 0.5) / levels
    return np.sqrt(betaincinv(0.5, (dim_cubic - 1) / 2, levels_p))


def _lloyd_map(centroids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Lloyd step on the positive half, and its Jacobian as a banded matrix.

    Returns (updated centroids, cell masses, Jacobian of the step in ``solve_banded`` layout).
    With edges e_i = (c_i + c_(i+1)) / 2, the conditional mean T_i of the cell [e_(i-1), e_i]
    moves with its edges as dT_i/de_i = f(e_i) (e_i - T_i) / m_i and
    dT_i/de_(i-1) = f(e_(i-1)) (T_i - e_(i-1)) / m_i.
    """
    edges = _half_edges(centroids)
    updated, mass = _half_centroids(edges, dim)
    density = coordinate_density(edges, dim)
    safe_mass = np.where(mass > 0, mass, np.inf)
    lower = density[:-1] * (updated - edges[:-1]) / safe_mass
    upper = density[1:] * (edges[1:] - updated) / safe_mass
    lower[0] = 0.0  # the edge at 0 is fixed by symmetry
    upper[-1] = 0.0  # the edge at 1 is fixed
    jacobian = np.zeros((3, centroids.size))
    jacobian[0, 1:] = 0.5 * upper[:-1]  # dT_i / dc_(i+1)
    jacobian[1] = 0.5 * (lower + upper)  # dT_i / dc_i
    jacobian[2, :-1] = 0.5 * lower[1:]  # dT_i / dc_(i-1)
    return updated, mass, jacobian


def solve_codebook(dim: int, bits: int) -> Codebook:
    """Solve the Lloyd-Max codebook for (dim, bits) without any cache.

    The density is symmetric, so only the positive half is solved (2^(b-1) cells on [0, 1]
    with the middle edge at 0) and then mirrored. The Lloyd fixed point T(c) = c is found by
    Newton's method on T(c) - c (its Jacobian is tridiagonal), started from the Panter-Dite
    point density and damped so that centroids stay ordered; plain Lloyd iteration needs tens
    of thousands of steps at b = 8.
    """
    check_dim_bits(dim, bits)
    levels = 2 ** (bits - 1)
    centroids = _initial_half_centroids(dim, levels)
    for iteration in range(1, _MAX_ITERATIONS + 1):  # noqa: B007 (reported in the Codebook)
        updated, _, jacobian = _lloyd_map(centroids, dim)
        residual = updated - centroids
        if np.max(np.abs(residual)) < _TOLERANCE:
            break
        jacobian[1] -= 1.0
        step = solve_banded((1, 1), jacobian, -residual)
        scale = 1.0
        while scale > 1e-6:
            trial = centroids + scale * step
            if trial[0] > 0 and np.all(np.diff(trial) > 0) and trial[-1] < 1:
                break
            scale *= 0.5
        else:
            trial = updated  # fall back to a plain Lloyd step
        centroids = trial
    else:
        raise RuntimeError(f"Lloyd-Max solve for d={dim}, b={bits} did not converge")
    centroids, _ = _half_centroids(_half_edges(centroids), dim)
    full = np.concatenate([-centroids[::-1], centroids])
    return Codebook(dim, bits, full, _full_edges(full), _distortion(centroids, dim), iteration)


def cache_dir() -> Path:
    """The directory for tq's on-disk caches: ``$TQ_CACHE_DIR`` or ``~/.cache/tq``."""
    return Path(os.environ.get("TQ_CACHE_DIR", Path.home() / ".cache" / "tq"))


def _cache_path(dim: int, bits: int) -> Path:
    return cache_dir() / "codebooks" / f"lloyd-max-d{dim}-b{bits}.json"


def _problem(data: dict, dim: int, bits: int) -> str | None:
    """Why a cache file's content is not the Lloyd-Max codebook for (dim, bits), or None."""
    if data.get("format") != _FORMAT:
        return f"format {data.get('format')!r}, expected {_FORMAT!r}"
    if (data.get("dim"), data.get("bits")) != (dim, bits):
        return f"holds d={data.get('dim')!r}, b={data.get('bits')!r}, its name says d={dim}, b={bits}"
    try:
        centroids = np.array(data.get("centroids"), dtype=np.float64)
    except (TypeError, ValueError):
        return "centroids are not a list of numbers"
    levels = 2**bits
    if centroids.shape != (levels,):
        return f"{centroids.size} centroids, expected 2^{bits} = {levels}"
    outside = ~(np.abs(centroids) < 1)  # NaN included
    if outside.any():
        index = int(np.argmax(outside))
        return f"centroid {index} is {float(centroids[index])!r}, outside (-1, 1)"
    if np.any(np.diff(centroids) <= 0):
        index = int(np.argmax(np.diff(centroids) <= 0))
        return f"centroids {index} and {index + 1} are not increasing"
    if not np.array_equal(centroids, -centroids[::-1]):
        return "centroids are not symmetric about 0"
    half = centroids[levels // 2 :]
    means, _ = _half_centroids(_half_edges(half), dim)
    residual = float(np.max(np.abs(means - half)))
    if residual > _FIXED_POINT_TOLERANCE:
        return f"not a Lloyd-Max solution (a centroid is {residual:.3g} from its cell's mean)"
    distortion = data.get("distortion")
    if not isinstance(distortion, float) or not np.isfinite(distortion):
        return f"distortion {distortion!r} is not a finite number"
    recomputed = _distortion(half, dim)
    if abs(distortion - recomputed) > _DISTORTION_TOLERANCE:
        return f"distortion {distortion!r}, but the centroids give {recomputed!r}"
    return None


def _read_cached(dim: int, bits: int) -> Codebook | None:
    """The disk cache's codebook for (dim, bits) if there is one and it verifies (module
    docstring); a file that does not is reported with a :class:`~tq.core.fileio.CacheWarning`."""
    data = read_cache_json(
        _cache_path(dim, bits), lambda data: _problem(data, dim, bits), "solving the codebook again"
    )
    if data is None:
        return None
    centroids = np.array(data["centroids"], dtype=np.float64)
    return Codebook(dim, bits, centroids, _full_edges(centroids), float(data["distortion"]), 0)


def _write_cached(codebook: Codebook) -> None:
    payload = {
        "format": _FORMAT,
        "dim": codebook.dim,
        "bits": codebook.bits,
        "centroids": codebook.centroids.tolist(),
        "distortion": codebook.distortion,
    }
    try:
        write_checked_json(_cache_path(codebook.dim, codebook.bits), payload)
    except OSError:
        pass  # a read-only cache directory only costs a re-solve next time


@functools.cache
def lloyd_max_codebook(dim: int, bits: int) -> Codebook:
    """The Lloyd-Max codebook for (dim, bits), from memory, the disk cache, or a fresh solve."""
    check_dim_bits(dim, bits)
    dim, bits = int(dim), int(bits)
    cached = _read_cached(dim, bits)
    if cached is not None:
        return cached
    codebook = solve_codebook(dim, bits)
    _write_cached(codebook)
    return codebook
