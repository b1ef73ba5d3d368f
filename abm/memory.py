"""Memory windows: the last k rounds each memory slot remembers, as right-aligned arrays."""

from __future__ import annotations

import numpy as np

from abm.game import EMPTY


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # a fresh view or copy: the tables stay writable
    return array


class Memory:
    """``n_slots`` windows of ``window`` rounds (own action, opponent's action).

    Column -1 of a slot's window is the most recent round; unfilled columns
    hold -1. What a slot stands for (a match side, an agent-opponent pair, an
    agent) is the engine's business: this class only remembers. The tables are
    stored round-major, (window, n_slots), so that appending a round shifts
    contiguous blocks; ``mine`` and ``theirs`` are (n_slots, window) views.

    Args:
        n_slots: The number of windows.
        window: The rounds each window holds (0: nothing is remembered).
    """

    def __init__(self, n_slots: int, window: int) -> None:
        """Start with every window empty."""
        self.window = window
        self._mine = np.full((window, n_slots), EMPTY, np.int8)
        self._theirs = np.full((window, n_slots), EMPTY, np.int8)
        self.length = np.zeros(n_slots, np.int32)

    @property
    def mine(self) -> np.ndarray:
        """Each slot's own actions, (n_slots, window), most recent in column -1."""
        return self._mine.T

    @property
    def theirs(self) -> np.ndarray:
        """Each slot's opponent's actions, (n_slots, window), most recent in column -1."""
        return self._theirs.T

    def read(self, slots: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mine, theirs, length) of these slots, read-only.

        A slice gives views of the tables, not copies; they cannot be written
        through, so a reader cannot change what the slots remember.

        Args:
            slots: the slots to read, as a slice or an index array.

        Returns:
            ``mine`` and ``theirs`` as (slots, window) arrays and ``length``.
        """
        return (
            _read_only(self._mine[:, slots].T),
            _read_only(self._theirs[:, slots].T),
            _read_only(self.length[slots]),
        )

    def push(
        self, slots: np.ndarray | None, mine: np.ndarray, theirs: np.ndarray, unique: bool = True
    ) -> None:
        """Append one round per entry.

        Args:
            slots: The slot of each entry; None means every slot, in order.
            mine: The own action of each entry.
            theirs: The opponent's action of each entry.
            unique: False when a slot may appear several times; its rounds then go
                in in the order given.
        """
        if len(mine) == 0 or self.window == 0:
            return
        if unique or slots is None:
            for table, new in ((self._mine, mine), (self._theirs, theirs)):
                if slots is None:  # shift in place: contiguous block moves
                    table[:-1] = table[1:]
                    table[-1] = new
                else:
                    block = table[:, slots]
                    block[:-1] = block[1:]
                    block[-1] = new
                    table[:, slots] = block
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
        for table, new in ((self._mine, mine), (self._theirs, theirs)):
            old = table[:, targets].T
            merged = np.where(from_old, np.take_along_axis(old, old_index, 1), new[new_index])
            table[:, targets] = merged.T
        self.length[targets] = np.minimum(self.length[targets] + count, k)
