"""Which committed steps to keep: the last ``keep_last``, every ``keep_every``-th, and the protected."""

from __future__ import annotations

from collections.abc import Iterable


def steps_to_keep(steps: Iterable[int], keep_last: int, keep_every: int = 0, protected: Iterable[int] = ()) -> set[int]:
    """The subset of ``steps`` that retention keeps.

    ``keep_every`` = 0 disables the periodic tier. ``protected`` holds steps that must survive
    regardless (the newest verified step, a step being loaded).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} would delete the newest checkpoint; use keep_last >= 1")
    ordered = sorted(set(steps))
    keep = set(ordered[-keep_last:])
    if keep_every > 0:
        keep.update(s for s in ordered if s % keep_every == 0)
    keep.update(s for s in protected if s in ordered)
    return keep
