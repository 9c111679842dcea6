"""Giving freed C heap back to the system in long-lived processes (job and inference processes).

glibc keeps what native code frees (the rtc SDK's audio buffers, onnxruntime's and
ctranslate2's tensors) in its arenas, fragmented, so a process in a call holds much more heap
than it uses. `malloc_trim(0)` returns every whole free page; it takes a few milliseconds on a
process's heap, so it runs every HEAP_TRIM_INTERVAL_S, never after each request: a trimmed
page needed again costs a fault and zeroing, which on a hot path (an inference per TTS chunk)
costs more than it saves. A no-op where malloc_trim is missing (musl, macOS).
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable
from typing import Final

HEAP_TRIM_INTERVAL_S: Final = 10.0


def _load_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_trim = _load_trim()


async def trim_periodically(interval: float = HEAP_TRIM_INTERVAL_S) -> None:
    """Trim every `interval` seconds until cancelled (only wait to be cancelled where there is
    no malloc_trim)."""
    if _trim is None:
        await asyncio.Event().wait()
        return
    while True:
        await asyncio.sleep(interval)
        _trim()
