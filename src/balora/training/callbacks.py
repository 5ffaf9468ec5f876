"""A tqdm progress bar that shows the running task loss and each BA-LoRA term (replaces the
Trainer's bar, which prints whole log dictionaries)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

_SHORT = {"task_loss": "task", "balora/consistency": "CR", "balora/diversity": "DR", "balora/svd": "SVD",
          "loss": "loss"}


class BALoraProgressCallback(TrainerCallback):
    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        shown = {short: f"{logs[key]:.4g}" for key, short in _SHORT.items() if key in logs}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
