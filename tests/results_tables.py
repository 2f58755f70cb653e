"""Shared readers of the tests that hold the committed results to their write-ups: JSON files and markdown tables."""

from __future__ import annotations

import functools
import json
from pathlib import Path


@functools.cache  # read once: the results tests read the same few files many times
def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def markdown_table_rows(markdown: str, header_start: str) -> list:
    """The cells of each row of the first table whose header line starts with ``header_start`` ([] if none)."""
    lines = markdown.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith(header_start)]
    if not starts:
        return []
    rows = []
    for line in lines[starts[0] + 2 :]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def percent(value: float, sign: bool = False) -> str:
    """``value`` x 100 with two decimals, as the tables round metrics; minus as U+2212, as the README writes it."""
    return f"{100 * value:{'+' if sign else ''}.2f}".replace("-", "−")
