"""`BALoraTrainerMixin`: BA-LoRA's loss inside transformers' Trainer (and TRL's SFTTrainer).

The loop, the optimiser, accelerate, logging and checkpoints stay the Trainer's. The mixin only
replaces `compute_loss`: one student forward, one no-grad reference forward (snapshot or teacher),
the task loss and the three regularisers, weighted by λ (optionally scheduled) and normalised so that
gradient accumulation does not change the result (docs/method.md §5).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from balora.core.config import BALoraConfig
from balora.core.fused import OutputLayerFactor, nlg_terms_from_hidden, supports_fused
from balora.core.losses import MicroBatchTerms, nlg_terms, nlu_svd_is_degenerate, nlu_terms
from balora.core.reference import ReferenceSnapshot, reference_forward, teacher_forward

logger = logging.getLogger(__name__)

TERMS = ("consistency", "diversity", "svd")
# Keys that collators (ours, TRL's) add but the model's forward does not take.
_NON_MODEL_KEYS = ("labels", "completion_mask", "assistant_masks")


def capture_head_input(model: nn.Module, store: list[torch.Tensor]) -> Any:
    """Append the input of a classification model's head (``classifier`` or ``score``: the pooled
    features) to ``store`` on every forward; returns the hook handle (``.remove()`` it when done)."""
    unwrapped = getattr(model, "module", model)  # DDP
    core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped  # PEFT
    head = getattr(core, "classifier", None) or getattr(core, "score", None)
    if head is None:
        raise ValueError("nlu target 'features' needs a model with a `classifier` or `score` head")
    return head.register_forward_pre_hook(lambda _module, args: store.append(args[0]))


class BALoraTrainerMixin:
    """Mix into a `transformers.Trainer` subclass: ``class T(BALoraTrainerMixin, Trainer)``.

    Args:
        balora_config: the regularisers; ``None`` trains with the task loss alone (LoRA, PiSSA, DoRA
            baselines through the same code path, so that comparisons differ only in the method).
        reference_model: an explicit frozen teacher for the consistency term (``reference="teacher"``).
            By default the reference is the student with its initial trainable tensors switched in.
        fused_loss: for causal LMs with a plain frozen output layer, compute the task loss and the
            terms from the final hidden states in chunks of ``loss_chunk_size`` valid positions
            (`balora.core.fused`), never holding (tokens × vocabulary) logits for backward. Exact; falls
            back to full logits, with a logged reason, when the model does not qualify.

    Logged at each logging step (means over the window): ``task_loss``, the raw terms
    ``balora/consistency``, ``balora/diversity``, ``balora/svd``, the weighted ones
    ``balora/weighted_<term>`` and the weights ``balora/lambda_<term>`` — named as the
    `BALoraConfig` fields (``lambda_consistency`` ...).
    """

    _fused_checked = False

    def __init__(
        self,
        *args: Any,
        balora_config: BALoraConfig | None = None,
        reference_model: nn.Module | None = None,
        fused_loss: bool = True,
        loss_chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.balora_config = balora_config
        self.reference_model = reference_model
        self.loss_chunk_size = loss_chunk_size
        self._fused = self._fused_head(fused_loss)
        self._snapshot: ReferenceSnapshot | None = None
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._micro_batches = 0
        self._warned_degenerate = False
        if balora_config is None:
            return
        if balora_config.reference == "teacher":
            if reference_model is None:
                raise ValueError("BALoraConfig.reference='teacher' needs reference_model=<a frozen pre-trained model>")
            reference_model.requires_grad_(False)
            reference_model.to(self.args.device)
        elif reference_model is not None:
            raise ValueError("reference_model was given but BALoraConfig.reference is 'snapshot'; "
                             "set reference='teacher'")
        elif balora_config.lambda_consistency > 0:
            self._snapshot = ReferenceSnapshot.for_peft_model(self.accelerator.unwrap_model(self.model))

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        cfg = self.balora_config if model.training else None
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        task = cfg.task if cfg is not None else self._task_of(model)
        if task == "nlg" and model.training and self._fused is not None:
            outputs, terms = self._fused_nlg_terms(model, model_inputs, labels, cfg)
            if terms is not None:
                loss = self._combine(terms, num_items_in_batch)
                return (loss, outputs) if return_outputs else loss

        features: list[torch.Tensor] = []
        hook = capture_head_input(model, features) if self._needs_features(cfg) else None
        try:
            outputs = model(**model_inputs)
        finally:
            if hook is not None:
                hook.remove()
        ref_logits = self._reference_logits(model, model_inputs) if cfg is not None else None

        try:
            if task == "nlg":
                terms = nlg_terms(outputs.logits, labels, cfg, ref_logits)
            else:
                self._warn_if_degenerate(cfg, outputs.logits)
                terms = nlu_terms(outputs.logits, labels, cfg, ref_logits, features[0] if features else None)
        except torch.linalg.LinAlgError as error:  # the SVD of non-finite logits: training has diverged
            raise FloatingPointError(self._diverged_message("the SVD term's input (non-finite logits)")) from error
        loss = self._combine(terms, num_items_in_batch, record=model.training)
        return (loss, outputs) if return_outputs else loss

    def _combine(
        self, terms: MicroBatchTerms, num_items_in_batch: torch.Tensor | int | None, record: bool = True
    ) -> torch.Tensor:
        """task + Σ λ_i·w·L_i with the Trainer's gradient-accumulation convention (docs/method.md §5).

        When the Trainer passes ``num_items_in_batch`` (the items of the whole accumulation window)
        it does not divide the loss by the accumulation count: the task loss is then summed and
        divided by the window's items, and each per-micro-batch mean regulariser is weighted by
        count / window items, so its share does not change with the accumulation count. Otherwise
        everything is a micro-batch mean and the Trainer divides by the accumulation count.
        """
        window_normalised = num_items_in_batch is not None and self.model_accepts_loss_kwargs
        if window_normalised:
            denom = torch.as_tensor(num_items_in_batch, device=terms.task_sum.device, dtype=torch.float32)
            weight = terms.count / denom.clamp(min=1)
        else:
            denom = terms.count.float()
            weight = torch.ones((), device=terms.task_sum.device)
        # clamp: a micro-batch without a valid label gives 0, never 0 / 0
        loss = terms.task_sum / denom.clamp(min=1)
        if not record:  # evaluation: the task loss alone, nothing logged into the training window
            return loss
        self._record("task_loss", terms.task_sum / terms.count.clamp(min=1))
        cfg = self.balora_config
        if cfg is not None:
            lambdas = cfg.lambdas_at(self.state.global_step, self.state.max_steps)
            for name, lam in zip(TERMS, lambdas):
                value = getattr(terms, name)
                if value is None:
                    continue
                loss = loss + (lam * weight) * value
                self._record(name, value)
                self._record(f"weighted_{name}", lam * value)
        self._micro_batches += 1
        if window_normalised and self.args.average_tokens_across_devices:
            # As Trainer.compute_loss: the window count spans every rank and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return loss

    # ------------------------------------------------------------------ logit-free NLG path
    def _fused_head(self, wanted: bool) -> tuple[torch.Tensor, torch.Tensor | None, OutputLayerFactor] | None:
        """(weight, bias, SVD factor) of the output layer when the NLG loss can be computed from the
        final hidden states in chunks (no (tokens × vocabulary) tensor kept for backward)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not wanted or self._task_of(unwrapped) != "nlg":
            return None
        ok, reason = supports_fused(unwrapped)
        if not ok:
            logger.warning("BA-LoRA: computing the loss from full logits: %s", reason)
            return None
        head = unwrapped.get_output_embeddings()
        return head.weight, head.bias, OutputLayerFactor(head.weight, head.bias)

    def _fused_nlg_terms(self, model: nn.Module, model_inputs: dict[str, Any], labels: torch.Tensor,
                         cfg: BALoraConfig | None) -> tuple[Any, MicroBatchTerms | None]:
        """Student forward that keeps only the last position's logits and returns the final hidden
        states (after the final norm), then the task loss and the terms from them, chunk-wise."""
        weight, bias, factor = self._fused
        light = {"output_hidden_states": -1, "logits_to_keep": 1}
        outputs = model(**model_inputs, **light)
        hidden = outputs.hidden_states[-1] if outputs.hidden_states is not None else None
        if not self._fused_checked:
            self._fused_checked = True
            last = None if hidden is None else nn.functional.linear(hidden[:, -1:].detach(), weight, bias)
            if last is None or outputs.logits is None or not torch.allclose(
                    last.float(), outputs.logits.float(), rtol=1e-3, atol=1e-3):
                logger.warning("BA-LoRA: the model's last hidden state does not give its logits through the "
                               "output layer; computing the loss from full logits")
                self._fused = None
                return outputs, None
        ref_hidden = None
        if cfg is not None and cfg.lambda_consistency > 0:
            ref_hidden = self._reference_outputs(model, {**model_inputs, **light}).hidden_states[-1]
        terms = nlg_terms_from_hidden(hidden, labels, weight, bias, cfg, ref_hidden,
                                      chunk_size=self.loss_chunk_size, svd_factor=factor)
        return outputs, terms

    # ------------------------------------------------------------------ the reference
    def _reference_outputs(self, model: nn.Module, model_inputs: dict[str, Any]) -> Any:
        """The pre-trained model's outputs: the snapshot swapped into the student, or the teacher."""
        if self.balora_config.reference == "teacher":
            return teacher_forward(self.reference_model, **model_inputs)
        return reference_forward(self.accelerator.unwrap_model(model), self._snapshot, **model_inputs)

    def _reference_logits(self, model: nn.Module, model_inputs: dict[str, Any]) -> torch.Tensor | None:
        cfg = self.balora_config
        if cfg is None or cfg.lambda_consistency == 0:
            return None
        return self._reference_outputs(model, model_inputs).logits

    @property
    def reference_snapshot(self) -> ReferenceSnapshot | None:
        return self._snapshot

    # ------------------------------------------------------------------ NLU helpers
    @staticmethod
    def _task_of(model: nn.Module) -> str:
        """"nlu" for sequence-classification models, else "nlg" (used when no BALoraConfig says)."""
        unwrapped = getattr(model, "module", model)  # DDP
        core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped  # PEFT
        return "nlu" if type(core).__name__.endswith("ForSequenceClassification") else "nlg"

    @staticmethod
    def _needs_features(cfg: BALoraConfig | None) -> bool:
        return cfg is not None and cfg.task == "nlu" and "features" in (cfg.nlu_diversity_target, cfg.nlu_svd_target)

    def _warn_if_degenerate(self, cfg: BALoraConfig | None, logits: torch.Tensor) -> None:
        if cfg is None or self._warned_degenerate or cfg.lambda_svd == 0:
            return
        self._warned_degenerate = True
        if nlu_svd_is_degenerate(cfg, logits.shape[-1], self.args.per_device_train_batch_size):
            logger.warning(
                "BA-LoRA NLU SVD term: k=%d >= min(batch, classes=%d), so the top-k share of the logits is "
                "always 1 and the term has no gradient (docs/method.md §4, as specified). Set "
                "nlu_svd_target='features' to apply it to the pooled features instead.",
                cfg.svd_k, logits.shape[-1],
            )

    def _diverged_message(self, what: str) -> str:
        return (
            f"BA-LoRA: {what} at step {self.state.global_step}. Checkpoints already written to "
            f"{self.args.output_dir} are intact. Lower the learning rate or the λ of the term, use float32 "
            "or bf16 instead of fp16, or check the data for broken examples."
        )

    # ------------------------------------------------------------------ logging
    def _record(self, name: str, value: torch.Tensor) -> None:
        current = self._sums[name]
        self._sums[name] = current.to(value.device) + value.detach().double()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the window averages of the task loss and each raw and λ-weighted term to a training log."""
        if "loss" in logs and self._micro_batches > 0:
            names = sorted(self._sums)
            stacked = torch.stack([self._sums[n] for n in names]).float() / self._micro_batches
            stacked = self.accelerator.reduce(stacked, reduction="mean")
            for name, value in zip(names, stacked.tolist()):
                key = name if name == "task_loss" else f"balora/{name}"
                logs[key] = value
                if not math.isfinite(value):
                    raise FloatingPointError(self._diverged_message(f"{key} became {value}"))
            if self.balora_config is not None:
                lambdas = self.balora_config.lambdas_at(self.state.global_step, self.state.max_steps)
                for name, lam in lambdas._asdict().items():
                    logs[f"balora/lambda_{name}"] = lam
            self._sums.clear()
            self._micro_batches = 0
        super().log(logs, *args, **kwargs)


class BALoraTrainer(BALoraTrainerMixin, Trainer):
    """`transformers.Trainer` with BA-LoRA's loss."""
