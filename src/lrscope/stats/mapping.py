"""Value-to-bucket mapping of the log-bucket sketch.

A positive finite value ``x = 2**e * (1 + f)`` with ``0 <= f < 1`` falls in bucket
``key = e * SUBBUCKETS + floor(f * SUBBUCKETS)``: the exponent and the top
``MANTISSA_BITS`` bits of the mantissa.  Every bucket spans a relative width below
``1 / SUBBUCKETS`` (1.6 %), so its midpoint is within 0.8 % of any value in it.

The same key can be read straight off the bits of an IEEE float32, which is how
the framework backends bucket on their own device without a ``log``::

    key = (bits >> (23 - MANTISSA_BITS)) - 127 * SUBBUCKETS      # x > 0, normal float32

>>> import numpy as np
>>> keys = value_to_key(np.array([1.0, 1.5, 3.0]))
>>> keys.tolist()
[0, 32, 96]
>>> key_to_value(keys).round(3).tolist()
[1.008, 1.508, 3.016]
>>> float32_bits_to_key(np.array([1.5], np.float32).view(np.int32) >> FLOAT32_SHIFT).tolist()
[32]
"""

from __future__ import annotations

import numpy as np

MANTISSA_BITS = 6
SUBBUCKETS = 1 << MANTISSA_BITS
#: Right shift that turns float32 bits into (sign, exponent, top mantissa bits).
FLOAT32_SHIFT = 23 - MANTISSA_BITS
#: Number of float32 bit buckets (sign bit included) produced by a device backend.
FLOAT32_BUCKETS = 1 << (1 + 8 + MANTISSA_BITS)
_FLOAT32_EXPONENT_BUCKETS = 1 << (8 + MANTISSA_BITS)
_FLOAT32_BIAS = 127 * SUBBUCKETS
#: Upper bound of the relative error of a bucket's representative value.
RELATIVE_ACCURACY = 1.0 / (2 * SUBBUCKETS)


def value_to_key(x: np.ndarray) -> np.ndarray:
    """Bucket keys of positive finite float values (float64 subnormals included)."""
    mantissa, exponent = np.frexp(np.asarray(x, dtype=np.float64))
    # frexp gives x = mantissa * 2**exponent with mantissa in [0.5, 1).
    fraction = np.floor((2.0 * mantissa - 1.0) * SUBBUCKETS).astype(np.int64)
    return (exponent.astype(np.int64) - 1) * SUBBUCKETS + fraction


def key_to_value(key: np.ndarray) -> np.ndarray:
    """Representative value (bucket midpoint) of each key."""
    key = np.asarray(key, dtype=np.int64)
    exponent, fraction = np.divmod(key, SUBBUCKETS)
    return np.ldexp(1.0 + (fraction + 0.5) / SUBBUCKETS, exponent)


def key_to_lower_bound(key: np.ndarray) -> np.ndarray:
    """Smallest value that falls in each bucket."""
    exponent, fraction = np.divmod(np.asarray(key, dtype=np.int64), SUBBUCKETS)
    return np.ldexp(1.0 + fraction / SUBBUCKETS, exponent)


def float32_bucket_span(low: float, high: float) -> tuple[int, int]:
    """The first and last float32 bit bucket of every value in ``[low, high]`` when both are
    positive and finite; all buckets otherwise (NaN bounds too).

    >>> float32_bucket_span(1.0, 3.0), float32_bucket_span(-1.0, 3.0)
    ((8128, 8224), (0, 32767))
    """
    if not (0 < low and high < np.inf):
        return 0, FLOAT32_BUCKETS - 1
    first, last = (int(np.float32(x).view(np.uint32)) >> FLOAT32_SHIFT for x in (low, high))
    return first, last


def float32_bits_to_key(shifted: np.ndarray) -> np.ndarray:
    """Keys of buckets indexed by ``abs_float32_bits >> FLOAT32_SHIFT`` (sign bit cleared)."""
    return np.asarray(shifted, dtype=np.int64) - _FLOAT32_BIAS


_NONE = np.zeros(0, dtype=np.int64)
_NO_SPECIAL_VALUES = {f"{kind}_{sign}": 0 for kind in ("zero", "inf", "nan") for sign in ("positive", "negative")}


def split_float32_bucket_counts(counts: np.ndarray) -> dict[str, np.ndarray | int]:
    """Decode a device histogram over ``(float32_bits >> FLOAT32_SHIFT) & (FLOAT32_BUCKETS-1)``.

    Returns positive and negative (keys, counts), and the zero, +inf, -inf and NaN
    counts.  Float32 subnormals (below 1.2e-38) land in the exponent-0 buckets and are
    counted as zeros: the device path does not spend an extra pass on them.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (FLOAT32_BUCKETS,):
        raise ValueError(f"expected {FLOAT32_BUCKETS} bucket counts, got shape {counts.shape}")
    indices = np.flatnonzero(counts != 0)
    return split_float32_bucket_items(indices, counts[indices])


def split_float32_bucket_items(indices: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray | int]:
    """``split_float32_bucket_counts`` of a histogram given by its nonzero buckets only
    (``indices`` sorted, and their counts)."""
    indices, counts = np.asarray(indices, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    half = _FLOAT32_EXPONENT_BUCKETS
    if indices.size and int(indices[0]) >= SUBBUCKETS and int(indices[-1]) < half - SUBBUCKETS:
        # The usual case (eta, |delta theta|): positive, finite, normal values only.
        return {"positive": (indices - _FLOAT32_BIAS, counts), "negative": (_NONE, _NONE), **_NO_SPECIAL_VALUES}
    out: dict[str, np.ndarray | int] = {}
    for sign, offset in (("positive", 0), ("negative", half)):
        inside = (indices >= offset) & (indices < offset + half)
        local, local_counts = indices[inside] - offset, counts[inside]
        finite = (local >= SUBBUCKETS) & (local < half - SUBBUCKETS)
        out[sign] = (float32_bits_to_key(local[finite]), local_counts[finite])
        out[f"zero_{sign}"] = int(local_counts[local < SUBBUCKETS].sum())
        out[f"inf_{sign}"] = int(local_counts[local == half - SUBBUCKETS].sum())
        out[f"nan_{sign}"] = int(local_counts[local > half - SUBBUCKETS].sum())
    return out
