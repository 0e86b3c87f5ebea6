"""PyTorch Lightning: ``EffectiveLRMonitor``, the callback that logs the step really taken.

>>> import lightning, lrscope.lightning
>>> callback = lrscope.lightning.EffectiveLRMonitor(every=50)
>>> trainer = lightning.Trainer(callbacks=[callback], max_steps=1, logger=False,
...                             enable_checkpointing=False, enable_progress_bar=False,
...                             enable_model_summary=False)
"""

from lrscope.torch.lightning import EffectiveLRMonitor, LoggerSink

__all__ = ["EffectiveLRMonitor", "LoggerSink"]
