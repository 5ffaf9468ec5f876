"""BA-LoRA on TRL's SFTTrainer: the same mixin, composed with TRL's trainer instead of Trainer.

TRL stays optional: importing this module needs `pip install trl`.
"""

from __future__ import annotations

from trl import SFTTrainer

from balora.training.trainer import BALoraTrainerMixin


class BALoraSFTTrainer(BALoraTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` with BA-LoRA's loss. TRL prepares the data (chat templates, completion-only
    labels, packing); the mixin's `compute_loss` replaces TRL's loss with task + regularisers.
    TRL's extra training metrics (entropy, token accuracy) are not computed on this path."""
