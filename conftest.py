"""Loaded by pytest before anything it collects (tests, doctests of src/, README.md, docs/).

Triton first: importing triton after TensorFlow aborts the process ("LLVM ERROR:
inconsistency in registered CommandLine options": both register the same LLVM options),
and torch imports triton whenever it is installed, at the first optimizer's construction
(torch._dynamo).  Without a GPU, Triton kernels run on CPU tensors through Triton's
interpreter (tests/test_torch_triton.py), which triton reads when first imported.
"""

import importlib.util
import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401
