"""`SpectrumCallback`: snapshots of a classifier's head-input features and logits during training
(singular values and effective rank, `balora.experiments.lab.spectral`), for `balora lab spectrum`."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from balora.experiments.lab.spectral import effective_rank, singular_values
from balora.training.data import ClassificationDataConfig, build_classification_dataset, classification_collator
from balora.training.run import load_tokenizer, raw_splits
from balora.training.trainer import capture_head_input
from balora.utils import write_json

__all__ = ["KINDS", "SpectrumCallback", "snapshot_rows"]

KINDS = ("features", "logits")


def snapshot_rows(cfg: Any, n_examples: int) -> list[dict]:
    """A seeded sample of ``n_examples`` test records (original order), the same for every method and
    seed: it depends only on the data settings."""
    test = list(raw_splits(cfg)["test"])
    if not test:
        raise ValueError(f"{cfg.data.source}: no test split to take spectrum snapshots on")
    if n_examples >= len(test):
        return test
    keep = sorted(random.Random(f"{cfg.data.split_seed}/spectrum").sample(range(len(test)), n_examples))
    return [test[i] for i in keep]


def _head_input(store: list[Any]) -> Any:
    x = store[0]
    # BERT-style heads take the pooled (batch, hidden) vector; RoBERTa-style heads take the sequence
    # and use its first token
    return x[:, 0] if x.dim() == 3 else x


class SpectrumCallback(TrainerCallback):
    """Snapshots of the head's input features and the logits at ``steps`` (see the module doc).

    Writes ``<run_dir>/spectrum.json`` after each snapshot (merging with an existing file, so a resumed
    run keeps its earlier snapshots) and ``spectrum_final.npz`` at the end of training."""

    def __init__(self, cfg: Any, steps: Sequence[int], n_examples: int, *, center: bool = False,
                 batch_size: int = 64) -> None:
        self.cfg = cfg
        self.steps = sorted(set(int(s) for s in steps))
        self.n_examples = n_examples
        self.center = center
        self.batch_size = batch_size
        self.run_dir = Path(cfg.output_dir)
        self.path = self.run_dir / "spectrum.json"
        self._batches: list[dict[str, Any]] | None = None
        self._labels: list[int] = []

    # -- data, built lazily: label_map.json is written by train_run before training starts
    def _prepare(self) -> None:
        label_map = json.loads((self.run_dir / "label_map.json").read_text())
        d = self.cfg.data
        tokenizer = load_tokenizer(self.cfg)
        rows = snapshot_rows(self.cfg, self.n_examples)
        ccfg = ClassificationDataConfig(text_field=d.text_field, text_pair_field=d.text_pair_field,
                                        label_field=d.label_field, max_length=d.max_length)
        examples, _ = build_classification_dataset(rows, tokenizer, ccfg, label_map, f"{d.source}[test]")
        collate = classification_collator(tokenizer)
        self._labels = [int(e["labels"]) for e in examples]
        self._batches = [collate(examples[i:i + self.batch_size]) for i in range(0, len(examples), self.batch_size)]

    def _outputs(self, model: Any) -> tuple[np.ndarray, np.ndarray]:
        if self._batches is None:
            self._prepare()
        device = next(model.parameters()).device
        was_training = model.training
        devices = [device] if device.type == "cuda" else []
        features, logits = [], []
        model.eval()
        try:  # no dropout, no gradients, and the RNG streams (dropout, sampler) exactly as they were
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for batch in self._batches:
                    store: list[Any] = []
                    hook = capture_head_input(model, store)
                    try:
                        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                        out = model(**inputs)
                    finally:
                        hook.remove()
                    features.append(_head_input(store).float().cpu())
                    logits.append(out.logits.float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(features).numpy(), torch.cat(logits).numpy()

    def _load(self) -> dict[str, Any]:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"n_examples": None, "center": self.center, "snapshots": []}

    def snapshot(self, model: Any, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Record the spectra at ``step`` in spectrum.json; returns (features, logits)."""
        features, logits = self._outputs(model)
        entry: dict[str, Any] = {"step": step}
        for kind, matrix in zip(KINDS, (features, logits)):
            sv = singular_values(matrix, center=self.center)
            entry[kind] = {"shape": list(matrix.shape), "singular_values": sv.tolist(),
                           "effective_rank": effective_rank(sv) if sv.sum() > 0 else None}
        data = self._load()
        data.update(n_examples=len(self._labels), center=self.center)
        data["snapshots"] = sorted([s for s in data["snapshots"] if s["step"] != step] + [entry],
                                   key=lambda s: s["step"])
        write_json(self.path, data)
        return features, logits

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Step 0 (or the step a resumed run starts at), when it is a snapshot step."""
        if state.global_step in self.steps:  # 0 on a fresh run: the model before any update
            self.snapshot(model, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """A snapshot after each optimiser step in ``steps``."""
        if state.global_step in self.steps and state.global_step > 0:
            self.snapshot(model, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """The final step's snapshot (if not taken yet) and spectrum_final.npz for t-SNE."""
        done = {s["step"] for s in self._load()["snapshots"]}
        if state.global_step in done:
            features, logits = self._outputs(model)
        else:  # the last step was not in `steps`: record it too, t-SNE uses the final features
            features, logits = self.snapshot(model, state.global_step)
        np.savez_compressed(self.run_dir / "spectrum_final.npz", features=features, logits=logits,
                            labels=np.asarray(self._labels), step=state.global_step)
