"""The fenced code blocks of a Markdown file, with the HTML comment that marks a block.

A marker is an HTML comment on the last non-blank line before a block's opening fence, e.g.
`<!-- ci:test-command -->` or `<!-- readme-test: {"servers": true} -->`; tests/test_readme.py
says what the markers mean.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field

_OPEN = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w-]*)\s*$")
_CLOSE = re.compile(r"^\s*```\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
TEST_OPTIONS = "readme-test:"


@dataclass
class Block:
    """One fenced block: its language, its code (dedented), the line of its opening fence, and
    the marker before it (the comment's text, e.g. "ci:servers"), if any."""

    language: str
    code: str
    line: int
    marker: str | None = None
    options: dict = field(default_factory=dict)  # the JSON of a `readme-test:` marker

    @property
    def name(self) -> str:
        return f"{self.language}-line-{self.line}"


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of `text` in order.

    >>> [b.name for b in fenced_blocks("<!-- ci:x -->\\n```bash\\necho hi\\n```\\n")]
    ['bash-line-2']
    """
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        opening = _OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if _CLOSE.match(lines[j]))
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        marker = _marker_before(lines, i)
        options = {}
        if marker and marker.startswith(TEST_OPTIONS):
            options = json.loads(marker[len(TEST_OPTIONS) :])
        blocks.append(Block(opening["language"], code, i + 1, marker, options))
        i = end + 1
    return blocks


def _marker_before(lines: list[str], index: int) -> str | None:
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    found = _MARKER.match(lines[j]) if j >= 0 else None
    return found["body"] if found else None
