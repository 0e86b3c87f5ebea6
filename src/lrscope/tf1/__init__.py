"""TensorFlow 1 graph mode (``tf.compat.v1.train`` optimizers): tensors and summaries.

The classic question: ``print(sess.run(optimizer._lr_t))`` always shows the initial
1e-3 although Adam's step changes.  Two added lines answer it::

    alpha = lrscope.tf1.step_size(optimizer)      # once, after apply_gradients
    print(sess.run(alpha))                        # after each sess.run(train_op)

>>> import tensorflow as tf, lrscope.tf1
>>> with tf.Graph().as_default():
...     w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0])
...     optimizer = tf.compat.v1.train.AdamOptimizer(1e-3)
...     train_op = optimizer.minimize(tf.reduce_sum(w * w))
...     alpha = lrscope.tf1.step_size(optimizer)
...     with tf.compat.v1.Session() as sess:
...         sess.run(tf.compat.v1.global_variables_initializer())
...         _ = sess.run(train_op)
...         print(round(float(sess.run(alpha)), 7), lrscope.inspect(optimizer, session=sess).t)
0.0003162 1
"""

from __future__ import annotations

from lrscope._optional import require

require("tensorflow", "tensorflow")

from lrscope.tf1.monitor import TF1Monitor, summaries, watch  # noqa: E402
from lrscope.tf1.reader import (  # noqa: E402
    effective_lr, elementwise, inspect, learning_rate, next_step_size, report_ops,
    step_size, trained_variables,
)

__all__ = ["TF1Monitor", "effective_lr", "elementwise", "inspect", "learning_rate",
           "next_step_size", "report_ops", "step_size", "summaries", "trained_variables", "watch"]
