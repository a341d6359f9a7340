"""Progress bars for long loops: shown by the CLI on a terminal, never in library use.

Library calls stay silent, because a bar on stderr would surprise a program that
imports dsconv. The CLI turns bars on with :func:`enable_progress` unless ``-q``
was given, and a bar is drawn only when stderr is a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

__all__ = ["enable_progress", "progress"]

Item = TypeVar("Item")

# A bar appears only after this many seconds, so short runs print nothing.
DELAY_SECONDS = 0.5

enabled = False


def enable_progress(on: bool) -> None:
    """Turn progress bars on or off for this process."""
    global enabled
    enabled = on


def progress(items: Iterable[Item], *, description: str, total: int | None = None) -> Iterator[Item]:
    """Iterate over ``items`` with a bar on stderr when bars are enabled and stderr is a terminal."""
    show = enabled and sys.stderr.isatty()
    yield from tqdm(items, desc=description, total=total, disable=not show, leave=False, delay=DELAY_SECONDS, file=sys.stderr)
