"""A testing hook: kill this process with SIGKILL at a named point, to check that a run killed there
is resumed to the same result (tests/test_run_state.py).

``BALORA_FAULT=<point>:<n>[,<point>:<n>...]`` in the environment makes `maybe_fail(point)` send
SIGKILL to its own process the n-th time (1-based) ``point`` is reached. Without the variable (the
normal case) `maybe_fail` does nothing. The points:

    step          each training micro-batch's loss (the mixin's compute_loss): a kill mid-step
    checkpoint    inside a Trainer checkpoint save, after the weights, before the optimizer state and
                  trainer_state.json: a kill mid-checkpoint
    evaluate      before each split's evaluation after training: a kill mid-evaluation
    final-save    between the adapter and the converted LoRA in the final save: a kill mid-final-save
    cell          in `balora compare`, after a cell's training, before its evaluation and result.json

Nothing else reads the variable; it is not an option of balora.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BALORA_FAULT"
_seen: Counter[str] = Counter()


def _planned() -> dict[str, int]:
    plan: dict[str, int] = {}
    for part in os.environ.get(ENV, "").split(","):
        point, _, n = part.strip().partition(":")
        if point:
            plan[point] = int(n) if n.isdigit() else 1
    return plan


def maybe_fail(point: str) -> None:
    """SIGKILL this process when ``BALORA_FAULT`` names ``point`` and this is its n-th arrival."""
    if ENV not in os.environ:
        return
    _seen[point] += 1
    if _planned().get(point) == _seen[point]:
        os.kill(os.getpid(), signal.SIGKILL)

