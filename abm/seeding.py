"""One master seed, one independent random stream per purpose."""

from __future__ import annotations

import zlib

import numpy as np

PURPOSES = ("graph", "population", "pairing", "noise", "policy", "match_length", "mesa")


def stream(seed: int, purpose: str) -> np.random.Generator:
    """The generator for ``purpose``: the same seed and purpose always give the same stream,
    and adding a new purpose never shifts the existing ones."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]))


def fresh_seed() -> int:
    """A new seed from the OS, small enough to read and to type back in."""
    return int(np.random.SeedSequence().entropy % (2**32))
