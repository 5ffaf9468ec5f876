"""`BALoraTrainerMixin`: BA-LoRA's loss inside transformers' Trainer (and TRL's SFTTrainer).

The loop, the optimiser, accelerate, logging and checkpoints stay the Trainer's. The mixin only
replaces `compute_loss`: one student forward, one no-grad reference forward (snapshot or teacher),
the task loss and the three regularisers, weighted by λ (optionally scheduled) and normalised so that
gradient accumulation does not change the result (docs/method.md §5).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from balora.core.config import BALoraConfig
from balora.core.fused import OutputLayerFactor, nlg_cached_terms_from_hidden, nlg_terms_from_hidden, supports_fused
from balora.core.losses import MicroBatchTerms, nlg_terms, nlu_svd_is_degenerate, nlu_terms
from balora.core.reference import ReferenceSnapshot, reference_forward, teacher_forward
from balora.core.reference_cache import nlu_reference_logits
from balora.core.regularizers import valid_positions
from balora.core.sharded import full_tensor, is_partitioned, layers_to_wrap_without_embeddings
from balora.training.faults import maybe_fail

logger = logging.getLogger(__name__)

TERMS = ("consistency", "diversity", "svd")
# Keys that collators (ours, TRL's) add but the model's forward does not take.
_NON_MODEL_KEYS = ("labels", "completion_mask", "assistant_masks", "example_index")


def capture_head_input(model: nn.Module, store: list[torch.Tensor]) -> Any:
    """Append the input of a classification model's head (``classifier`` or ``score``: the pooled
    features) to ``store`` on every forward; returns the hook handle (``.remove()`` it when done)."""
    unwrapped = getattr(model, "module", model)  # DDP
    core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped  # PEFT
    head = getattr(core, "classifier", None) or getattr(core, "score", None)
    if head is None:
        raise ValueError("nlu target 'features' needs a model with a `classifier` or `score` head")
    return head.register_forward_pre_hook(lambda _module, args: store.append(args[0]))


# ---------------------------------------------------------------------------- checkpoints
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
            "model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_step(path: str | Path) -> int:
    """The step of ``.../checkpoint-<step>`` (-1 for another name)."""
    tail = Path(path).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (a kill during its save), or None when it is
    complete: trainer_state.json (written last by the Trainer) present and parseable, the model
    weights present, no empty file."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    files = [f for f in path.rglob("*") if f.is_file()]
    if not files:
        return "empty"
    empty = sorted(str(f.relative_to(path)) for f in files if f.stat().st_size == 0)
    if empty:
        return f"empty file(s): {', '.join(empty)}"
    if not any((path / name).is_file() for name in _WEIGHTS):
        return "no model weights"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json does not parse"
    return None


def sorted_checkpoints(directory: str | Path) -> list[Path]:
    """``checkpoint-<step>`` directories, by step."""
    directory = Path(directory)
    found = [p for p in directory.glob("checkpoint-*") if checkpoint_step(p) >= 0] if directory.is_dir() else []
    return sorted(found, key=checkpoint_step)


def latest_complete_checkpoint(directory: str | Path, max_step: int | None = None
                               ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The latest complete checkpoint (see `checkpoint_problem`) at or before ``max_step``, and the
    incomplete ones later than it, each with its problem."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(sorted_checkpoints(directory)):
        if max_step is not None and checkpoint_step(path) > max_step:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


@torch.no_grad()
def nonfinite_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable tensors holding a NaN or an infinity, trainable tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(not bool(torch.isfinite(p).all()) for p in params), len(params)


# ---------------------------------------------------------------------------- the mixin
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
        divergence_factor: stop (FloatingPointError) when a logged ``task_loss`` exceeds this factor
            times the median of the previously logged ones: a finite divergence (a loss of 1e15 after
            a learning rate of 1e3). ``None`` = off; a NaN or infinity always stops. A checkpoint
            whose trainable tensors are not all finite is never written.
        reference_cache: an opened `balora.training.reference_store.ReferenceStore` of this model's
            reference outputs on the training dataset, whose batches carry ``example_index``
            (`IndexedCollator`): the consistency term then reads the cache instead of running the
            reference forward (NLG: the fused path only; NLU: the cached pooled features through the
            step-0 head). Where it does not apply the online reference is kept, with a logged reason.

    Logged at each logging step (means over the window): ``task_loss``, the raw terms
    ``balora/consistency``, ``balora/diversity``, ``balora/svd``, the weighted ones
    ``balora/weighted_<term>`` and the weights ``balora/lambda_<term>`` — named as the
    `BALoraConfig` fields (``lambda_consistency`` ...).
    """

    _fused_checked = False
    _cache: Any = None  # the reference cache in use (see `_usable_cache`)

    def __init__(
        self,
        *args: Any,
        balora_config: BALoraConfig | None = None,
        reference_model: nn.Module | None = None,
        fused_loss: bool = True,
        loss_chunk_size: int = 1024,
        divergence_factor: float | None = 100.0,
        reference_cache: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            self._avoid_sharding_embeddings_twice(self.accelerator.state.fsdp_plugin)
        self.divergence_factor = divergence_factor
        self._logged_losses: list[float] = []
        self._healthy_step = 0  # the last step whose logged loss was healthy (finite, not diverged)
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
        self._cache = self._usable_cache(reference_cache)

    def _avoid_sharding_embeddings_twice(self, plugin: Any) -> None:
        """Under FSDP2 with TRANSFORMER_BASED_WRAP, leave out of the wrapped classes those that hold the input
        embeddings (BERT's BertEmbeddings): accelerate would shard them, then the embeddings again, and crash
        (`balora.core.sharded.layers_to_wrap_without_embeddings`)."""
        import functools

        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        policy = plugin.auto_wrap_policy
        policy = policy.func if isinstance(policy, functools.partial) else policy
        if plugin.fsdp_version != 2 or policy is not transformer_auto_wrap_policy:
            return
        names = layers_to_wrap_without_embeddings(self.accelerator.unwrap_model(self.model),
                                                   plugin.transformer_cls_names_to_wrap)
        if names is None:
            return
        if self.is_world_process_zero():
            logger.warning("FSDP2: wrapping %s only (accelerate 1.16 would shard the module holding the input "
                           "embeddings and then the embeddings again, and fail); set "
                           "fsdp_transformer_layer_cls_to_wrap: %s in the accelerate config to silence this",
                           names, ",".join(names))
        plugin.transformer_cls_names_to_wrap = names

    def _usable_cache(self, store: Any) -> Any:
        """The reference cache when it applies, else None (with the reason logged)."""
        cfg = self.balora_config
        if store is None:
            return None
        if cfg is None or cfg.lambda_consistency == 0:
            logger.warning("BA-LoRA: reference cache unused: no consistency term")
            return None
        if cfg.reference == "teacher":
            raise ValueError("reference_cache holds the snapshot's outputs; it cannot stand for reference='teacher'")
        if store.task != cfg.task:
            raise ValueError(f"reference_cache was built for task {store.task!r}, not {cfg.task!r}")
        if cfg.task == "nlg":
            if self._fused is None:
                logger.warning("BA-LoRA: reference cache unused: the loss is computed from full logits (online "
                               "reference forward)")
                return None
            if store.temperature != float(cfg.temperature):
                raise ValueError(f"reference_cache was built at temperature {store.temperature}, "
                                 f"not {cfg.temperature}")
        return store

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "example_index" not in self._signature_columns:  # kept for the reference cache's lookups
            self._signature_columns.append("example_index")

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        cfg = self.balora_config if model.training else None
        if model.training:
            maybe_fail("step")
        labels = inputs["labels"]
        if cfg is not None and self._cache is not None and inputs.get("example_index") is None:
            raise ValueError("reference_cache is set but the batch has no example_index: train on "
                             "reference_store.with_example_index(dataset) with IndexedCollator(collator)")
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        task = cfg.task if cfg is not None else self._task_of(model)
        if task == "nlg" and model.training and self._fused is not None:
            outputs, terms = self._fused_nlg_terms(model, model_inputs, labels, cfg, inputs.get("example_index"),
                                                   num_items_in_batch)
            if terms is not None:
                loss = self._combine(terms, num_items_in_batch)
                return (loss, outputs) if return_outputs else loss

        # The reference first: under FSDP2 its forward reuses the buffers the student's backward would need.
        if cfg is None:
            ref_logits = None
        elif task == "nlu" and self._cache is not None and inputs.get("example_index") is not None:
            ref_logits = self._cached_nlu_logits(model, inputs["example_index"])
        else:
            ref_logits = self._reference_logits(model, model_inputs)
        features: list[torch.Tensor] = []
        hook = capture_head_input(model, features) if self._needs_features(cfg) else None
        try:
            outputs = model(**model_inputs)
        finally:
            if hook is not None:
                hook.remove()

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
        window_normalised, denom, weight = self._normalisers(terms.count, num_items_in_batch)
        # terms.weighted: task / denom + λ1·w·L_CR + λ2·w·L_DR, already combined (the cached fused path)
        loss = terms.task_sum / denom if terms.weighted is None else terms.weighted
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
                if terms.weighted is None or name == "svd":
                    loss = loss + (lam * weight) * value
                self._record(name, value)
                self._record(f"weighted_{name}", lam * value)
        self._micro_batches += 1
        if window_normalised and self.args.average_tokens_across_devices:
            # As Trainer.compute_loss: the window count spans every rank and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return loss

    def _normalisers(self, count: torch.Tensor, num_items_in_batch: torch.Tensor | int | None,
                     ) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """(window-normalised?, the task loss's divisor, the regularisers' weight), see `_combine`; the
        divisor is clamped to ≥ 1: a micro-batch without a valid label gives 0, never 0 / 0."""
        window_normalised = num_items_in_batch is not None and self.model_accepts_loss_kwargs
        if window_normalised:
            denom = torch.as_tensor(num_items_in_batch, device=count.device, dtype=torch.float32).clamp(min=1)
            return True, denom, count / denom
        return False, count.float().clamp(min=1), torch.ones((), device=count.device)

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

    def _bound_head(self, fused: tuple[torch.Tensor, torch.Tensor | None, OutputLayerFactor],
                    ) -> tuple[torch.Tensor, torch.Tensor | None, OutputLayerFactor] | None:
        """The output layer as the model holds it now (an engine such as FSDP2 replaces parameters when it
        wraps the model, after this trainer was built), gathered whole if sharded: it is frozen, so one
        full copy per rank serves every step (its memory is counted in docs/guide/distributed.md).
        None (full logits from then on) when DeepSpeed ZeRO-3 has partitioned it."""
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if is_partitioned(head.weight):
            logger.warning("BA-LoRA: the output layer is partitioned by DeepSpeed ZeRO-3; computing the loss "
                           "from full logits")
            return None
        weight, bias = full_tensor(head.weight), None if head.bias is None else full_tensor(head.bias)
        if weight is fused[0] and bias is fused[1]:
            return fused
        return weight, bias, OutputLayerFactor(weight, bias)

    def _fused_nlg_terms(self, model: nn.Module, model_inputs: dict[str, Any], labels: torch.Tensor,
                         cfg: BALoraConfig | None, example_index: torch.Tensor | None = None,
                         num_items_in_batch: torch.Tensor | int | None = None,
                         ) -> tuple[Any, MicroBatchTerms | None]:
        """Student forward that keeps only the last position's logits and returns the final hidden
        states (after the final norm), then the task loss and the terms from them, chunk-wise."""
        if not self._fused_checked:
            self._fused = self._bound_head(self._fused)
            if self._fused is None:
                self._fused_checked = True
                return None, None
        weight, bias, factor = self._fused
        light = {"output_hidden_states": -1, "logits_to_keep": 1}
        consistency = cfg is not None and cfg.lambda_consistency > 0
        cached = consistency and self._cache is not None and example_index is not None
        # The reference before the student (FSDP2 reuses the forward's buffers; see balora.core.reference).
        ref_hidden = (self._reference_outputs(model, {**model_inputs, **light}).hidden_states[-1]
                      if consistency and not cached else None)
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
        if cached:
            # the weights are known before the pass, so task, consistency and diversity share one
            # gradient product per chunk: PiSSA's cost (docs/design/reference-cache.md)
            u, s = self._cache.nlg_entries(example_index.tolist())
            _, denom, weight_ = self._normalisers(valid_positions(labels).sum(), num_items_in_batch)
            lam1, lam2, _ = cfg.lambdas_at(self.state.global_step, self.state.max_steps)
            terms = nlg_cached_terms_from_hidden(
                hidden, labels, weight, bias, cfg, (u, s), 1.0 / denom, lam1 * weight_, lam2 * weight_,
                chunk_size=self.loss_chunk_size, svd_factor=factor)
            return outputs, terms
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

    def _cached_nlu_logits(self, model: nn.Module, example_index: torch.Tensor) -> torch.Tensor:
        """The reference logits from the cached pre-trained features: the step-0 head applied to them."""
        unwrapped = self.accelerator.unwrap_model(model)
        core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        head = getattr(core, "classifier", None) or getattr(core, "score", None)
        prefix = next(f"{name}." for name, module in unwrapped.named_modules() if module is head)
        state = {n[len(prefix):]: t for n, t in self._snapshot.matching(unwrapped).items() if n.startswith(prefix)}
        weight = next(head.parameters())
        features = self._cache.nlu_features(example_index.tolist()).to(weight.device, weight.dtype)
        return nlu_reference_logits(features, head, state)

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
        directory, healthy = self.args.output_dir, self._healthy_step
        last, _ = latest_complete_checkpoint(directory)
        if last is None:
            where = "none was written yet"
        else:
            where = f"the last finite checkpoint is {last}"
            if checkpoint_step(last) > healthy:
                before, _ = latest_complete_checkpoint(directory, max_step=healthy)
                where += (f"; the last one at or before step {healthy}, the last logged step with a healthy loss, "
                          f"is {before or 'none'} (later ones may already hold diverging weights)")
        return (
            f"BA-LoRA: {what} at step {self.state.global_step}. Checkpoints already written to {directory} are "
            f"intact (one with non-finite weights is never written): {where}. Lower the learning rate or the λ "
            "of the term, use float32 or bf16 instead of fp16, or check the data for broken examples."
        )

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: nn.Module, trial: Any, *args: Any, **kwargs: Any) -> None:
        """The Trainer's checkpoint, refused when a trainable tensor is not finite (a checkpoint that
        `--resume` would otherwise pick up)."""
        bad, total = nonfinite_trainable(self.model)
        if bad:
            raise FloatingPointError(self._diverged_message(
                f"{bad} of {total} trainable tensors became non-finite (checkpoint-{self.state.global_step} "
                "not written)"))
        super()._save_checkpoint(model, trial, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        maybe_fail("checkpoint")  # testing hook (balora.training.faults): a kill mid-checkpoint
        super()._save_optimizer_and_scheduler(output_dir)

    def _check_divergence(self, value: float) -> None:
        """A finite task loss far above the median of the previous logged ones stops training."""
        factor = self.divergence_factor
        if factor is not None and self._logged_losses:
            median = statistics.median(self._logged_losses)
            if median > 0 and value > factor * median:
                raise FloatingPointError(self._diverged_message(
                    f"task_loss {value:.4g} exceeds divergence_factor {factor:g} × {median:.4g} (the median of "
                    "the previous logged task losses)"))
        self._logged_losses.append(value)
        self._healthy_step = self.state.global_step

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
            if "task_loss" in logs:
                self._check_divergence(logs["task_loss"])
            if self.balora_config is not None:
                lambdas = self.balora_config.lambdas_at(self.state.global_step, self.state.max_steps)
                for name, lam in lambdas._asdict().items():
                    logs[f"balora/lambda_{name}"] = lam
            self._sums.clear()
            self._micro_batches = 0
        super().log(logs, *args, **kwargs)


class BALoraTrainer(BALoraTrainerMixin, Trainer):
    """`transformers.Trainer` with BA-LoRA's loss."""
