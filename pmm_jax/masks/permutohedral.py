"""The permutohedral lattice (Adams, Baek and Davis, Eurographics 2010) in JAX, as densecrf's
``permutohedral.cpp`` builds and filters it: the fast high-dimensional Gaussian filter under
the JAX dense CRF (``pmm_jax.masks.dense_crf_jax``).

:func:`build_lattice` embeds ``features [N, d]`` (one row per pixel, already divided by the
kernel widths) in the lattice; :func:`lattice_filter` is the unnormalised Gaussian filter
``K v`` of a signal ``v [N, V]`` (splat onto the lattice points, blur along the d+1 lattice
directions, slice back); :func:`normalized_filter` is densecrf's symmetric normalisation
``n * K(n * v)``, ``n = 1 / sqrt(K 1 + 1e-20)``.

It reproduces densecrf's arithmetic step by step (float32 elevation, round to nearest, rank
and barycentric weights, blur ``v + 0.5 (v[n1] + v[n2])`` along the d+1 directions in order
0..d, slice scaled by ``1 / (1 + 2^-d)``), so the CRF built on it matches pydensecrf up to
float rounding.

Static shapes: the lattice of N pixels has at most ``(d + 1) N`` points (each pixel touches
the d+1 vertices of its simplex); it is stored in a table of a static ``capacity``. Points are
deduplicated by a lexicographic ``lax.sort`` of their integer keys (packed two 16-bit
coordinates per word), the sorted key table is the hash (neighbour lookups are a vectorised
lexicographic binary search), splatting is a segment sum, slicing a gather. The true number of
points is always computed (``Lattice.num_points``): a table too small for the features is
detected (``Lattice.overflow``), never silently wrong; sizing the tables is the caller's job.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# densecrf adds this to K 1 before the inverse square root.
NORM_EPS = 1e-20
# Lattice coordinates are packed as 16-bit fields (densecrf keeps them as C short); KEY_MAX
# leaves the all-ones word free as the padding of unused table rows, which sorts last.
KEY_MIN, KEY_MAX = -32768, 32766
_PAD_WORD = np.uint32(0xFFFFFFFF)


class Lattice(NamedTuple):
    """A permutohedral lattice over N pixels with a table of ``capacity`` points.

    ``offsets[i, r]``: table row of the r-th vertex of pixel i's simplex (``capacity``, the
    always-zero dummy row, where the table overflowed). ``weights[i, r]``: its barycentric
    weight (0 for padding pixels and overflowed vertices). ``neighbours[j, 0|1, m]``: rows of
    the two neighbours of point m along lattice direction j (the dummy row where absent).
    ``norm``: densecrf's symmetric normalisation ``1 / sqrt(K 1 + 1e-20)`` (0 on padding).
    ``num_points``: the true number of distinct lattice points, also when it exceeds capacity.
    ``keys_in_range``: False when a lattice coordinate does not fit 16 bits (a kernel width
    far too small for the image; densecrf would silently wrap its ``short`` keys).
    """

    offsets: jax.Array
    weights: jax.Array
    neighbours: jax.Array
    norm: jax.Array
    num_points: jax.Array
    keys_in_range: jax.Array

    @property
    def capacity(self):
        """Number of table rows (static)."""
        return self.neighbours.shape[-1] - 1

    @property
    def overflow(self):
        """True where the table was too small or keys overflowed (results are then invalid)."""
        return (self.num_points > self.capacity) | ~self.keys_in_range


def _scale_factors(dim):
    """Diagonal of densecrf's elevation matrix times its ``inv_std_dev``, rounded as in C++."""
    inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (dim + 1))
    return [np.float32(1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std_dev))
            for i in range(dim)]


def _embed(features):
    """Simplex vertices and barycentric weights of each feature vector (Adams et al. 2010).

    Returns ``keys [N, d+1, d]`` int32 (first d lattice coordinates of the d+1 vertices, the
    last is implied) and ``weights [N, d+1]`` float32, with the same float32 operations as
    densecrf's SSE ``Permutohedral::init`` (elevation summed in the same order).
    """
    dim = features.shape[1]
    scale = _scale_factors(dim)
    down, up = np.float32(1.0 / (dim + 1)), np.float32(dim + 1)

    # Elevate onto the plane sum(x) = 0: elevated[j] = sum_{i >= j} cf_i - j cf_{j-1}.
    columns = [None] * (dim + 1)
    running = jnp.zeros(features.shape[:1], jnp.float32)
    for j in range(dim, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        columns[j] = running - np.float32(j) * cf
        running = running + cf
    columns[0] = running
    elevated = jnp.stack(columns, axis=1)

    # Nearest 0-coloured lattice point (round half to even, as SSE) and its coordinate sum.
    rounded = jnp.round(elevated * down)
    rem0 = rounded * up
    coord_sum = jnp.sum(rounded, axis=1, keepdims=True).astype(jnp.int32)

    # rank[i]: position of coordinate i when the residuals are sorted; as densecrf, for each
    # pair i < j, rank_i gains one when residual_i < residual_j, else rank_j does.
    residual = elevated - rem0
    less = residual[:, :, None] < residual[:, None, :]
    later = np.triu(np.ones((dim + 1, dim + 1), bool), 1)
    rank = (jnp.sum(less & later, axis=2) + jnp.sum(~less & later, axis=1)).astype(jnp.int32)
    # Bring the point back onto the plane (coordinate sum zero).
    shifted = rank + coord_sum
    wrap = (shifted < 0).astype(jnp.int32) - (shifted > dim).astype(jnp.int32)
    rank = shifted + (dim + 1) * wrap
    rem0 = rem0 + up * wrap.astype(jnp.float32)

    # Barycentric weights (p. 10 of the paper): b[k] = v[rank d-k] - v[rank d-k+1], where v is
    # the scaled residual of the coordinate with that rank, and b[0] wraps around.
    value = (elevated - rem0) * down
    by_rank = jnp.sum(jnp.where(rank[:, :, None] == np.arange(dim + 1), value[:, :, None], 0.0),
                      axis=1)
    descending = by_rank[:, ::-1]
    weights = jnp.concatenate([descending[:, :1] + (1.0 - by_rank[:, :1]),
                               descending[:, 1:] - descending[:, :-1]], axis=1)

    # Vertex r of the simplex: rem0 + canonical[r][rank], canonical[r][k] = r if k <= d - r
    # else r - (d + 1).
    remainder = np.arange(dim + 1, dtype=np.int32)[None, :, None]
    canonical = jnp.where(rank[:, None, :dim] <= dim - remainder, remainder, remainder - dim - 1)
    keys = rem0[:, None, :dim].astype(jnp.int32) + canonical
    return keys, weights


def _pack(keys):
    """Pack 16-bit lattice coordinates two per uint32 word: ``[..., d]`` -> ``[..., ceil(d/2)]``.

    Lexicographic order of the words equals that of the coordinates, so sorting and searching
    need half as many keys. Coordinates must lie in ``[KEY_MIN, KEY_MAX]`` (densecrf itself
    stores them as C ``short``).
    """
    biased = (keys - KEY_MIN).astype(jnp.uint32)
    if keys.shape[-1] % 2:
        biased = jnp.concatenate([biased, jnp.zeros(biased.shape[:-1] + (1,), jnp.uint32)], -1)
    return (biased[..., 0::2] << 16) | biased[..., 1::2]


def _unpack(words, dim):
    """Inverse of ``_pack`` for ``dim`` coordinates."""
    high = (words >> 16).astype(jnp.int32) + KEY_MIN
    low = (words & 0xFFFF).astype(jnp.int32) + KEY_MIN
    return jnp.stack([high, low], axis=-1).reshape(words.shape[:-1] + (-1,))[..., :dim]


def _in_key_range(keys):
    """True for the rows of ``keys [..., d]`` whose coordinates all fit ``_pack``."""
    return jnp.all((keys >= KEY_MIN) & (keys <= KEY_MAX), axis=-1)


def _sort_points(words):
    """Deduplicate packed keys ``words [P, w]``: lexicographically sorted words, first-occurrence
    flags, point index of every sorted row and of every original row, number of points."""
    num_rows, width = words.shape
    operands = [words[:, c] for c in range(width)] + [jnp.arange(num_rows, dtype=jnp.int32)]
    *sorted_cols, order = jax.lax.sort(operands, num_keys=width)
    sorted_words = jnp.stack(sorted_cols, axis=1)
    is_new = jnp.concatenate(
        [jnp.ones((1,), bool), jnp.any(sorted_words[1:] != sorted_words[:-1], axis=1)])
    sorted_point = jnp.cumsum(is_new, dtype=jnp.int32) - 1
    point = jnp.zeros(num_rows, jnp.int32).at[order].set(sorted_point, unique_indices=True)
    return sorted_words, is_new, sorted_point, point, sorted_point[-1] + 1


def _lex_less(a, b):
    """Row-wise lexicographic ``a < b`` of two ``[Q, w]`` integer arrays."""
    less = jnp.zeros(a.shape[:1], bool)
    for c in reversed(range(a.shape[1])):
        less = jnp.where(a[:, c] == b[:, c], less, a[:, c] < b[:, c])
    return less


def _lookup(table, queries):
    """Row of each query in the lexicographically sorted ``table`` (``len(table)`` if absent).

    A vectorised binary search: the static-shape replacement of densecrf's hash table.
    """
    capacity = table.shape[0]

    def step(_, bounds):
        lo, hi = bounds
        active = lo < hi
        mid = (lo + hi) // 2
        go_right = _lex_less(jnp.take(table, mid, axis=0, mode="clip"), queries)
        return (jnp.where(active & go_right, mid + 1, lo),
                jnp.where(active & ~go_right, mid, hi))

    zeros = jnp.zeros(queries.shape[:1], jnp.int32)
    lo, _ = jax.lax.fori_loop(0, max(1, math.ceil(math.log2(capacity + 1))), step,
                              (zeros, zeros + capacity))
    found = (lo < capacity) & jnp.all(jnp.take(table, lo, axis=0, mode="clip") == queries, axis=1)
    return jnp.where(found, lo, capacity)


def _blur_neighbours(table, num_points, dim):
    """``[d+1, 2, C+1]`` rows of each point's neighbours ``key -/+ (-1, .., d at j, .., -1)``.

    ``table [C, w]``: packed keys, sorted, unused rows padded. Row C is the dummy (always
    zero) point: absent neighbours and unused rows point to it.
    """
    capacity = table.shape[0]
    steps = np.full((dim + 1, dim), -1, np.int32)
    steps[np.arange(dim), np.arange(dim)] = dim
    queries = _unpack(table, dim)[None] + steps[:, None, :]
    forward = _lookup(table, _pack(queries).reshape(-1, table.shape[1])).reshape(dim + 1, capacity)
    usable = _in_key_range(queries) & (jnp.arange(capacity) < num_points)
    forward = jnp.where(usable, forward, capacity)
    forward = jnp.concatenate([forward, jnp.full((dim + 1, 1), capacity, jnp.int32)], axis=1)
    # n2 is the inverse of n1: if n1_j(p) = q then n2_j(q) = p.
    directions = jnp.arange(dim + 1)[:, None]
    backward = jnp.full((dim + 1, capacity + 1), capacity, jnp.int32)
    backward = backward.at[directions, forward].set(jnp.arange(capacity + 1, dtype=jnp.int32)[None])
    backward = backward.at[:, capacity].set(capacity)
    return jnp.stack([forward, backward], axis=1)


def _splat_blur_slice(offsets, weights, neighbours, values):
    """Permutohedral filter ``K values`` of ``values [N, V]`` (densecrf's ``compute``)."""
    num_pixels, num_vertices = weights.shape
    dim = num_vertices - 1
    contributions = (weights[:, :, None] * values[:, None, :]).reshape(-1, values.shape[1])
    grid = jax.ops.segment_sum(contributions, offsets.reshape(-1),
                               num_segments=neighbours.shape[-1])

    def blur(j, grid):
        return grid + 0.5 * (grid[neighbours[j, 0]] + grid[neighbours[j, 1]])

    grid = jax.lax.fori_loop(0, dim + 1, blur, grid)
    alpha = np.float32(1.0 / (1.0 + 2.0 ** -dim))
    # An elementwise product and sum, not a dot: full float32 on every backend (no TF32).
    return jnp.sum((weights * alpha)[:, :, None] * grid[offsets], axis=1)


@functools.partial(jax.jit, static_argnames="capacity")
def build_lattice(features, capacity, valid=None):
    """Permutohedral lattice of ``features [N, d]`` in a table of ``capacity`` points.

    ``valid [N]`` bool (None: all pixels) masks padding: padding pixels take the features of
    the first valid pixel (so they add no lattice point) and get zero weight, so the lattice
    of a padded image acts exactly like the unpadded one.
    Jittable with a static ``capacity``; check ``Lattice.overflow`` before trusting results.
    """
    features = jnp.asarray(features, jnp.float32)
    num_pixels, dim = features.shape
    valid = jnp.ones(num_pixels, bool) if valid is None else jnp.asarray(valid, bool).reshape(-1)
    features = jnp.where(valid[:, None], features, features[jnp.argmax(valid)])
    keys, weights = _embed(features)
    keys_in_range = jnp.all(_in_key_range(keys))
    sorted_words, is_new, sorted_point, point, num_points = _sort_points(
        _pack(keys).reshape(num_pixels * (dim + 1), -1))
    table = jnp.full((capacity, sorted_words.shape[1]), _PAD_WORD, jnp.uint32)
    table = table.at[jnp.where(is_new, sorted_point, capacity)].set(sorted_words, mode="drop")

    point = point.reshape(num_pixels, dim + 1)
    stored = point < capacity
    offsets = jnp.where(stored, point, capacity)
    weights = jnp.where(stored & valid[:, None], weights, 0.0)
    neighbours = _blur_neighbours(table, num_points, dim)

    ones = valid.astype(jnp.float32)[:, None]
    norm = jax.lax.rsqrt(_splat_blur_slice(offsets, weights, neighbours, ones)[:, 0] + NORM_EPS)
    return Lattice(offsets, weights, neighbours, jnp.where(valid, norm, 0.0), num_points,
                   keys_in_range)


@jax.jit
def lattice_filter(lattice, values):
    """Unnormalised permutohedral Gaussian filter ``K values`` of ``values [N, V]``."""
    return _splat_blur_slice(lattice.offsets, lattice.weights, lattice.neighbours, values)


@jax.jit
def normalized_filter(lattice, values):
    """densecrf's NORMALIZE_SYMMETRIC kernel: ``norm * K(norm * values)``."""
    norm = lattice.norm[:, None]
    return norm * lattice_filter(lattice, norm * values)
