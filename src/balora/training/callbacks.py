"""Progress bars: one for training, showing the running task loss and each BA-LoRA term (it replaces the
Trainer's bar, which prints whole log dictionaries), and one for each evaluation or prediction pass."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

_SHORT = {"task_loss": "task", "balora/consistency": "CR", "balora/diversity": "DR", "balora/svd": "SVD",
          "loss": "loss"}


class BALoraProgressCallback(TrainerCallback):
    def __init__(self) -> None:
        self.bar: Any = None
        self.eval_bar: Any = None

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

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or eval_dataloader is None:
            return
        try:
            total = len(eval_dataloader)
        except TypeError:  # an iterable dataset: no length, no bar
            return
        if self.eval_bar is None:
            self.eval_bar = tqdm(total=total, desc="evaluate", leave=self.bar is None, dynamic_ncols=True)
        self.eval_bar.update(1)

    def _close_eval_bar(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_eval_bar()
