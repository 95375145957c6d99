"""Frame sizes named in a job spec, shared by every model family's table: a family gives its named
sizes and its pixel multiple, this parses '540p' / 'WxH' the same way for all of them."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TypeVar

R = TypeVar("R")
_SIZE_PATTERN = re.compile(r"^(\d{2,5})x(\d{2,5})$")
MAX_SIDE = 8192


def parse_frame_size(text: str, named: Mapping[str, R], multiple: int, make: Callable[[str, int, int], R],
                     hint: str) -> R:
    """A named size (any case) or 'WxH' with both sides multiples of `multiple` in [16, 8192];
    ValueError names the bad value and `hint` (what is valid)."""
    key = str(text).strip().lower()
    if key in named:
        return named[key]
    match = _SIZE_PATTERN.match(key)
    if match:
        width, height = int(match.group(1)), int(match.group(2))
        if width % multiple == 0 and height % multiple == 0 and 16 <= min(width, height) \
                and max(width, height) <= MAX_SIDE:
            return make(key, width, height)
    raise ValueError(f"{text!r} is not a resolution; use {hint}")
