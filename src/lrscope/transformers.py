"""Hugging Face Transformers: ``EffectiveLRCallback`` for ``Trainer``.

>>> import lrscope.transformers
>>> callback = lrscope.transformers.EffectiveLRCallback(every=50)
>>> callback.monitor is None          # attached when training begins
True
"""

from lrscope.torch.transformers import EffectiveLRCallback

__all__ = ["EffectiveLRCallback"]
