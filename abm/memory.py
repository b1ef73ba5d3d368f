"""Memory windows: the last k rounds each memory slot remembers, as right-aligned arrays."""

from __future__ import annotations

import numpy as np

from abm.game import EMPTY


class Memory:
    """``n_slots`` windows of ``window`` rounds (own action, opponent's action).

    Column -1 is the most recent round; unfilled columns hold -1. What a slot
    stands for (a match side, an agent-opponent pair, an agent) is the
    engine's business: this class only remembers.
    """

    def __init__(self, n_slots: int, window: int) -> None:
        self.window = window
        self.mine = np.full((n_slots, window), EMPTY, np.int8)
        self.theirs = np.full((n_slots, window), EMPTY, np.int8)
        self.length = np.zeros(n_slots, np.int32)

    def read(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.mine[slots], self.theirs[slots], self.length[slots]

    def push(self, slots: np.ndarray | None, mine: np.ndarray, theirs: np.ndarray,
             unique: bool = True) -> None:
        """Append one round per entry; ``slots=None`` means every slot in order. With
        ``unique=False`` a slot may appear several times; its rounds go in in order."""
        if len(mine) == 0 or self.window == 0:
            return
        if unique or slots is None:
            for table, new in ((self.mine, mine), (self.theirs, theirs)):
                if slots is None:  # in-place shift: no gather/scatter of the whole table
                    table[:, :-1] = table[:, 1:]
                    table[:, -1] = new
                else:
                    rows = table[slots]
                    rows[:, :-1] = rows[:, 1:]
                    rows[:, -1] = new
                    table[slots] = rows
            rows = slice(None) if slots is None else slots
            self.length[rows] = np.minimum(self.length[rows] + 1, self.window)
            return
        order = np.argsort(slots, kind="stable")
        slots, mine, theirs = slots[order], mine[order], theirs[order]
        targets, start, count = np.unique(slots, return_index=True, return_counts=True)
        k = self.window
        # position j of the new window is position j + count of (old window ++ new rounds)
        src = np.arange(k)[None, :] + count[:, None]
        from_old = src < k
        new_index = np.clip(start[:, None] + src - k, 0, len(slots) - 1)
        old_index = np.minimum(src, k - 1)
        for table, new in ((self.mine, mine), (self.theirs, theirs)):
            old = table[targets]
            table[targets] = np.where(from_old, np.take_along_axis(old, old_index, 1), new[new_index])
        self.length[targets] = np.minimum(self.length[targets] + count, k)
