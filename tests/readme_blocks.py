"""The README's fenced code blocks, as a reader copies them (indentation of a list item removed)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)


def code_blocks(lang: str) -> list[str]:
    blocks = []
    for match in FENCE.finditer(README.read_text()):
        if match["lang"] == lang:
            indent = len(match["indent"])
            lines = match["body"].splitlines(keepends=True)
            blocks.append("".join(line[indent:] if line.strip() else "\n" for line in lines))
    return blocks


def commands(block: str) -> list[str]:
    """A shell block's commands, one per item: comments dropped, continued lines joined."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
