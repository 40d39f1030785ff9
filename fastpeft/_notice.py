"""One-time notices, for when an op leaves the fast path (unsupported shape, dtype, dropout)."""

from __future__ import annotations

import warnings


class FastPeftFallbackWarning(UserWarning):
    """An op ran on the reference path instead of a CUDA kernel. Filter it with `warnings.filterwarnings`."""


_seen: set[str] = set()


def notice_once(key: str, message: str) -> None:
    """Warn with `message` the first time `key` is seen in this process."""
    if key in _seen:
        return
    _seen.add(key)
    warnings.warn(message, FastPeftFallbackWarning, stacklevel=3)


def reset_notices() -> None:
    """Forget which notices were shown (for tests)."""
    _seen.clear()
