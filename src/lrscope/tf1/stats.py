"""Distribution statistics of eta as TF1 graph ops, and their decoding on the host.

Per variable: float32 bit buckets (``mapping``) counted with ``bincount``, exact finite
min/max/sum/sum of squares, the eps-dominated count and the update and parameter squared
norms, all computed in the graph and fetched by the caller in one ``session.run``.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from lrscope.formulas import Elementwise
from lrscope.report import ParamReport, decode_statistics
from lrscope.stats import mapping

_MASK = mapping.FLOAT32_BUCKETS - 1


def statistics(
    el: Elementwise, param: tf.Tensor, with_update: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """(bucket counts, packed scalars) of eta over one variable, computed in the graph."""
    eta = tf.reshape(tf.broadcast_to(el.eta, tf.shape(param)), [-1])
    bits = tf.bitcast(tf.cast(eta, tf.float32), tf.int32)
    keys = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, mapping.FLOAT32_SHIFT), _MASK)
    counts = tf.math.bincount(
        keys, minlength=mapping.FLOAT32_BUCKETS, maxlength=mapping.FLOAT32_BUCKETS, dtype=tf.int64
    )
    values = tf.cast(eta, tf.float64)
    finite = tf.math.is_finite(values)
    zero = tf.zeros_like(values)
    absent = tf.constant(-1.0, tf.float64)

    def squares(x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(tf.reshape(x, [-1]), tf.float64)
        return tf.reduce_sum(x * x)

    eps = (
        absent
        if el.eps_dominated is None
        else tf.reduce_sum(tf.cast(tf.broadcast_to(el.eps_dominated, tf.shape(param)), tf.float64))
    )
    scalars = tf.stack(
        [
            tf.reduce_min(tf.where(finite, values, zero + math.inf)),
            tf.reduce_max(tf.where(finite, values, zero - math.inf)),
            tf.reduce_sum(tf.where(finite, values, zero)),
            tf.reduce_sum(tf.where(finite, values * values, zero)),
            eps,
            squares(el.update(param)) if with_update else absent,
            squares(param),
        ]
    )
    return counts, scalars




def param_reports(values: dict[str, tuple[np.ndarray, np.ndarray]],
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, ParamReport]:
    """ParamReports from the fetched ``{name: (counts, scalars)}`` of ``statistics``."""
    params = {}
    for name, (counts, scalars) in values.items():
        dist, update_norm, param_norm = decode_statistics(np.asarray(counts), scalars)
        params[name] = ParamReport(name=name, shape=shapes[name], effective_lr=dist,
                                   update_norm=update_norm, param_norm=param_norm)
    return params
