"""One module per framework: read optimizer state, compute on the framework's device.

Each backend exposes ``accepts(obj)``, ``inspect(obj, **options)`` and
``watch(obj, **options)``; ``lrscope._dispatch`` picks one without importing any
framework that is not already imported.
"""
