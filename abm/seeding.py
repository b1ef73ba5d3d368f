"""One master seed, one independent random stream per purpose."""

from __future__ import annotations

import zlib

import numpy as np

PURPOSES = ("graph", "population", "pairing", "noise", "policy", "match_length", "mesa")


def stream(seed: int, purpose: str) -> np.random.Generator:
    """The random generator for one purpose of a run.

    The same seed and purpose always give the same stream, and adding a new purpose
    never shifts the existing ones (each stream is seeded from the seed and a checksum
    of the purpose's name, not from a position in a sequence).

    Args:
        seed: The run's master seed.
        purpose: What the stream is for; ``PURPOSES`` lists the engine's.

    Returns:
        A fresh generator at the start of the stream.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]))


def fresh_seed() -> int:
    """A new seed from the OS, small enough to read and to type back in."""
    return int(np.random.SeedSequence().entropy % (2**32))
