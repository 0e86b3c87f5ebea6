"""A griffe extension for the API reference (``mkdocs.yml``): doctest examples as code blocks.

lrscope's docstrings keep their ``>>>`` examples in running text, where they run as doctests;
Markdown would read the prompts as nested block quotes and the expected output as text. This
extension wraps each example (its ``>>>``/``...`` lines and the expected output, up to a blank
line, as doctest reads it) in a ``pycon`` fence when griffe loads a docstring, leaving the
sources untouched.

>>> fence_doctests("Text.\\n>>> 1 + 1\\n2\\n\\nMore.").split("\\n")
['Text.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_PROMPT = re.compile(r"^(\s*)>>>(\s|$)")


def fence_doctests(text: str) -> str:
    """``text`` with every doctest example outside a fence wrapped in a ``pycon`` fence."""
    lines, out, i, in_fence = text.split("\n"), [], 0, False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else _PROMPT.match(line)
        if match is None:
            out.append(line)
            i += 1
            continue
        indent = match.group(1)
        if out and out[-1].strip():
            out.append("")  # a fence starts a block of its own
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the doctest examples of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
