"""An on-disk cache of the pre-trained model's outputs for BA-LoRA's consistency term (issue 16;
docs/design/reference-cache.md): the reference forward pass is run once, before training, instead of at
every step.

Per training example (keyed by its index in the training dataset, after templating and truncation):

* NLG: the (u, s) rows of its valid positions, in order (`balora.core.reference_cache`): u float32 (d,),
  s float32, one row per valid position, so that `consistency_from_cache` gives the term exactly;
* NLU: its pooled features (the classification head's input), float32 (h,): the step-0 head applied
  to them gives the reference logits (`nlu_reference_logits`), whatever the head's seed.

Layout: ``shard-00000.safetensors`` ... (``shard_size`` examples each; NLG: ``u`` (rows, d), ``s`` (rows,),
``offsets`` (examples + 1,); NLU: ``features`` (examples, h)) and ``manifest.json``: the hashes of what
the entries depend on (the pre-trained weights, the model config, the tokenizer, every example's token
ids and labels, overall and per shard), the dtype, the temperature (NLG) and the task. The manifest is
rewritten after each finished shard, so an interrupted build resumes from the last complete shard.
`open_store` refuses a cache whose manifest differs from the expected one, naming the item.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from balora.core.config import ConfigError
from balora.core.reference import ReferenceSnapshot, reference_forward
from balora.core.reference_cache import cache_entries_from_hidden
from balora.core.regularizers import valid_positions

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 20 * 10**9
# The manifest items compared by `open_store`, in this order (the first difference is named).
IDENTITY = ("format", "task", "dtype", "temperature", "model", "config", "tokenizer", "examples", "data",
            "shard_size")
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "id2label", "label2id", "num_labels")


# ---------------------------------------------------------------------------- hashes
def _sha(chunks: Any) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def head_prefix(model: nn.Module) -> str | None:
    """The parameter-name prefix of a classification model's head (``...classifier.``), else None."""
    unwrapped = _unwrap(model)
    core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    head = getattr(core, "classifier", None) or getattr(core, "score", None)
    if head is None:
        return None
    for name, module in unwrapped.named_modules():
        if module is head:
            return f"{name}."
    return None


def model_hash(model: nn.Module, snapshot: ReferenceSnapshot, *, exclude_head: bool = False) -> str:
    """sha256 of the *pre-trained* model's tensors: the model's parameters and buffers with the snapshot's
    (step-0) tensors switched in. A LoRA ``lora_A`` whose ``lora_B`` is zero at step 0 (gaussian LoRA) does
    not change the pre-trained function and is left out, so that the adapter's seed does not invalidate
    the cache; with ``exclude_head`` (NLU features) the classification head is left out too."""
    unwrapped = _unwrap(model)
    snap = snapshot.tensors
    skip = head_prefix(unwrapped) if exclude_head else None
    zero_b = {n.replace("lora_B", "lora_A") for n, t in snap.items() if "lora_B" in n and not bool(t.any())}

    def chunks():
        named = list(unwrapped.named_parameters()) + list(unwrapped.named_buffers())
        for name, tensor in sorted(named, key=lambda item: item[0]):
            if (skip and name.startswith(skip)) or name in zero_b:
                continue
            tensor = snap.get(name, tensor)
            yield f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode()
            yield _tensor_bytes(tensor)

    return _sha(chunks())


def config_hash(model: nn.Module) -> str:
    unwrapped = _unwrap(model)
    core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    config = core.config.to_dict()
    for key in _VOLATILE_CONFIG:
        config.pop(key, None)
    return _sha([json.dumps(config, sort_keys=True, default=str).encode()])


def tokenizer_hash(tokenizer: Any) -> str:
    if tokenizer is None:
        return "none"
    vocab = sorted(tokenizer.get_vocab().items())
    specials = getattr(tokenizer, "special_tokens_map", {})
    return _sha([type(tokenizer).__name__.encode(), json.dumps(vocab).encode(),
                 json.dumps(specials, sort_keys=True, default=str).encode()])


def _example_bytes(example: dict) -> bytes:
    labels = example.get("labels", example.get("label"))
    return json.dumps([list(example["input_ids"]), labels], default=str).encode()


def data_hash(dataset: Sequence[dict], start: int = 0, stop: int | None = None) -> str:
    """sha256 of the token ids and labels of ``dataset[start:stop]``."""
    stop = len(dataset) if stop is None else stop
    return _sha(_example_bytes(dataset[i]) for i in range(start, stop))


def reference_manifest(model: nn.Module, dataset: Sequence[dict], *, task: str, temperature: float,
                       tokenizer: Any = None, snapshot: ReferenceSnapshot | None = None,
                       shard_size: int = 1024) -> dict[str, Any]:
    """The identity of a cache for ``model`` (with its step-0 snapshot) on ``dataset``: what `open_store`
    compares. NLU features do not depend on the temperature or on the head (``temperature`` None)."""
    if task not in ("nlg", "nlu"):
        raise ValueError(f"task must be 'nlg' or 'nlu', got {task!r}")
    snapshot = snapshot or ReferenceSnapshot.for_peft_model(_unwrap(model))
    return {"format": FORMAT_VERSION, "task": task, "dtype": "float32",
            "temperature": float(temperature) if task == "nlg" else None,
            "model": model_hash(model, snapshot, exclude_head=task == "nlu"), "config": config_hash(model),
            "tokenizer": tokenizer_hash(tokenizer), "examples": len(dataset), "data": data_hash(dataset),
            "shard_size": int(shard_size)}


def identity_digest(manifest: dict[str, Any]) -> str:
    """A short name for a cache's identity (the `IDENTITY` items): runs whose caches would be the same
    get the same name, so that they can share one (``balora compare``)."""
    return _sha([json.dumps({k: manifest.get(k) for k in IDENTITY}, sort_keys=True).encode()])[:16]


def manifest_difference(found: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """The first identity item that differs, as ``"tokenizer differs (sha 1a2b…≠ 3c4d…)"``, or None."""
    for key in IDENTITY:
        a, b = found.get(key), expected.get(key)
        if a != b:
            what = {"model": "model weights", "config": "model config",
                    "data": "data (token ids and labels)"}.get(key, key)
            if isinstance(a, str) and isinstance(b, str) and len(a) == len(b) == 64:
                return f"{what} differs (sha {a[:12]}…≠ {b[:12]}…)"
            return f"{what} differs ({a!r} ≠ {b!r})"
    return None


# ---------------------------------------------------------------------------- reading
class ReferenceStore:
    """A complete cache, read per batch through memory-mapped safetensors files."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = Path(path), manifest
        self.task: str = manifest["task"]
        self.temperature: float | None = manifest["temperature"]
        self.shard_size: int = manifest["shard_size"]
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.manifest["examples"]

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            handle = safe_open(str(self.path / self.manifest["shards"][shard]["file"]), framework="pt")
            self._handles[shard] = handle
            if self.task == "nlg":
                self._offsets[shard] = handle.get_tensor("offsets").tolist()
        return self._handles[shard]

    def _check(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"reference cache {self.path}: example {index} is not in it ({len(self)} examples)")
        return divmod(index, self.shard_size)

    def nlg_entries(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(u (M, d), s (M,)) of the examples' valid positions, example after example."""
        us, ss = [], []
        for index in indices:
            shard, local = self._check(int(index))
            handle = self._handle(shard)
            a, b = self._offsets[shard][local], self._offsets[shard][local + 1]
            us.append(handle.get_slice("u")[a:b])
            ss.append(handle.get_slice("s")[a:b])
        return torch.cat(us), torch.cat(ss)

    def nlu_features(self, indices: Sequence[int]) -> torch.Tensor:
        """The examples' pooled features (N, h)."""
        rows = []
        for index in indices:
            shard, local = self._check(int(index))
            rows.append(self._handle(shard).get_slice("features")[local:local + 1])
        return torch.cat(rows)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _fix(path: Path) -> str:
    return f"rebuild with `balora reference build` (or delete {path}) or set reference_cache: off"


def open_store(path: str | Path, expected: dict[str, Any]) -> ReferenceStore:
    """The complete cache at ``path`` if its manifest matches ``expected`` (`reference_manifest`);
    ConfigError naming the first differing item otherwise."""
    path = Path(path)
    found = _read_manifest(path)
    if found is None:
        raise ConfigError(f"reference cache {path}: no readable {MANIFEST}; {_fix(path)}")
    difference = manifest_difference(found, expected)
    if difference is not None:
        raise ConfigError(f"reference cache {path}: {difference}; {_fix(path)}")
    if not found.get("complete"):
        raise ConfigError(f"reference cache {path}: incomplete ({len(found.get('shards', []))} shards written); "
                          "resume it with `balora reference build` or reference_cache: auto")
    return ReferenceStore(path, found)


# ---------------------------------------------------------------------------- building
def _valid_count(example: dict) -> int:
    labels = torch.as_tensor(list(example["labels"]))[None]
    return int(valid_positions(labels).sum())


def estimate_bytes(model: nn.Module, dataset: Sequence[dict], task: str) -> tuple[int, int]:
    """(bytes, entries): NLG (d + 1) float32 per valid position, NLU h float32 per example."""
    unwrapped = _unwrap(model)
    if task == "nlg":
        d = unwrapped.get_output_embeddings().weight.shape[1]
        rows = sum(_valid_count(ex) for ex in dataset)
        return rows * (d + 1) * 4 + (len(dataset) + 1) * 8, rows
    core = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    return len(dataset) * int(core.config.hidden_size) * 4, len(dataset)


def _write_shard(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    partial = file.with_name(f".{file.name}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, file)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    partial = path / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(partial, path / MANIFEST)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _nlg_shard(model: nn.Module, snapshot: ReferenceSnapshot, batches: list[dict], temperature: float,
               device: torch.device) -> dict[str, torch.Tensor]:
    head = model.get_output_embeddings()
    us, ss, counts = [], [], []
    for batch in batches:
        batch = _to(batch, device)
        labels = batch.pop("labels")
        inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "assistant_masks", "example_index")}
        out = reference_forward(model, snapshot, **inputs, output_hidden_states=-1, logits_to_keep=1)
        mask = valid_positions(labels)
        # rows per float64 (rows × V) softmax: ~32 MB each, so the build's peak stays below a training step's
        rows = max(1, 2**22 // head.weight.shape[0])
        u, s = cache_entries_from_hidden(out.hidden_states[-1][mask], head.weight, head.bias, temperature,
                                         chunk_size=rows)
        us.append(u.cpu())
        ss.append(s.cpu())
        counts += mask.sum(1).tolist()
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.as_tensor(counts, dtype=torch.int64).cumsum(0)
    return {"u": torch.cat(us), "s": torch.cat(ss), "offsets": offsets}


def _nlu_shard(model: nn.Module, snapshot: ReferenceSnapshot, batches: list[dict],
               device: torch.device) -> dict[str, torch.Tensor]:
    from balora.training.trainer import capture_head_input  # the trainer's own capture, no import cycle

    rows = []
    for batch in batches:
        batch = _to(batch, device)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_index")}
        captured: list[torch.Tensor] = []
        hook = capture_head_input(model, captured)
        try:
            reference_forward(model, snapshot, **inputs)
        finally:
            hook.remove()
        if captured[0].dim() != 2:
            raise ValueError(f"the classification head's input has shape {tuple(captured[0].shape)}: only pooled "
                             "(batch, hidden) features can be cached")
        rows.append(captured[0].float().cpu())
    return {"features": torch.cat(rows)}


def build_reference_cache(model: nn.Module, dataset: Sequence[dict], collator: Any, path: str | Path, *,
                          batch_size: int, temperature: float, task: str, tokenizer: Any = None,
                          snapshot: ReferenceSnapshot | None = None, shard_size: int = 1024,
                          max_bytes: int | None = DEFAULT_MAX_BYTES, device: torch.device | str | None = None,
                          manifest: dict[str, Any] | None = None, replace_stale: bool = False) -> ReferenceStore:
    """Run the reference forward (the model with its step-0 ``snapshot`` switched in, inference mode)
    over ``dataset`` once and write the cache to ``path``; returns it opened.

    Shards of ``shard_size`` examples are written one after the other, the manifest after each, so a
    build interrupted (killed) resumes from its last complete shard; a cache already complete is
    returned as it is. An existing cache with another identity is refused (ConfigError), or with
    ``replace_stale`` deleted and rebuilt (with a warning naming the difference). Processes building the
    same ``path`` at once take turns (a file lock): one builds, the others open its result. The estimated
    size is printed first; above ``max_bytes`` (None: no limit) the build is refused.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    path = Path(path)
    model = _unwrap(model)
    snapshot = snapshot or ReferenceSnapshot.for_peft_model(model)
    expected = manifest or reference_manifest(model, dataset, task=task, temperature=temperature,
                                              tokenizer=tokenizer, snapshot=snapshot, shard_size=shard_size)
    with _build_lock(path):
        found = _read_manifest(path)
        if found is not None:
            difference = manifest_difference(found, expected)
            if difference is not None and not replace_stale:
                raise ConfigError(f"reference cache {path}: {difference}; delete it to rebuild, or choose another "
                                  "path")
            if difference is not None:
                logger.warning("reference cache %s: %s; rebuilding it", path, difference)
                shutil.rmtree(path)
                path.mkdir(parents=True)
                found = None
            elif found.get("complete"):
                return ReferenceStore(path, found)
        return _build(model, dataset, collator, path, found, expected, batch_size=batch_size,
                      temperature=temperature, task=task, snapshot=snapshot, shard_size=shard_size,
                      max_bytes=max_bytes, device=device)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``<path>.lock`` (flock; released by the kernel if the process dies), so
    that processes wanting the same cache — DDP ranks, ``balora compare`` shards — build it once: the
    others wait, then find it complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(model: nn.Module, dataset: Sequence[dict], collator: Any, path: Path, found: dict[str, Any] | None,
           expected: dict[str, Any], *, batch_size: int, temperature: float, task: str,
           snapshot: ReferenceSnapshot, shard_size: int, max_bytes: int | None,
           device: torch.device | str | None) -> ReferenceStore:
    size, entries = estimate_bytes(model, dataset, task)
    per = "valid token" if task == "nlg" else "example"
    print(f"reference cache {path}: {size / 1e6:.1f} MB for {entries} {per}s of {len(dataset)} examples "
          f"({size / max(entries, 1):.0f} bytes per {per})", file=sys.stderr)
    if max_bytes is not None and size > max_bytes:
        raise ConfigError(f"reference cache {path}: {size / 1e9:.1f} GB exceeds the limit of {max_bytes / 1e9:.1f} GB; "
                          "raise max_bytes or set reference_cache: off")
    path.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    state = {**expected, "shards": [], "complete": False}
    for shard in (found or {}).get("shards", []):  # resume: the complete shards whose data still match
        start, stop = shard["examples"]
        if len(state["shards"]) * shard_size != start or not (path / shard["file"]).is_file() \
                or shard["data"] != data_hash(dataset, start, stop):
            break
        state["shards"].append(shard)
    if state["shards"]:
        logger.warning("reference cache %s: resuming after %d complete shards", path, len(state["shards"]))
    with torch.inference_mode():
        for start in range(len(state["shards"]) * shard_size, len(dataset), shard_size):
            stop = min(len(dataset), start + shard_size)
            batches = [collator([dataset[i] for i in range(b, min(stop, b + batch_size))])
                       for b in range(start, stop, batch_size)]
            tensors = (_nlg_shard(model, snapshot, batches, temperature, device) if task == "nlg"
                       else _nlu_shard(model, snapshot, batches, device))
            name = f"shard-{start // shard_size:05d}.safetensors"
            _write_shard(path / name, tensors)
            state["shards"].append({"file": name, "examples": [start, stop], "data": data_hash(dataset, start, stop),
                                    "rows": int(next(iter(tensors.values())).shape[0])})
            _write_manifest(path, state)
    state["complete"] = True
    _write_manifest(path, state)
    return ReferenceStore(path, state)


# ---------------------------------------------------------------------------- batches
class IndexedCollator:
    """Wraps a collator: each example's ``example_index`` (its row in the training dataset) is taken out
    before ``collator`` runs and returned as a ``(batch,)`` long tensor, so that the trainer fetches the
    batch's cache entries."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        indices = [f.get("example_index") for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != "example_index"} for f in features])
        if all(i is not None for i in indices):
            batch["example_index"] = torch.as_tensor(indices, dtype=torch.long)
        return batch


def with_example_index(dataset: Sequence[dict]) -> list[dict]:
    """The dataset's examples with their index as ``example_index``."""
    return [{**example, "example_index": i} for i, example in enumerate(dataset)]


# ---------------------------------------------------------------------------- a run's cache
def store_for_run(cfg: Any, model: nn.Module, tokenizer: Any, train: Sequence[dict], collator: Any,
                  out: Path, device: torch.device | str | None = None, *, path: Path | None = None,
                  shared_root: Path | None = None,
                  max_bytes: int | None = DEFAULT_MAX_BYTES) -> ReferenceStore | None:
    """The cache named by ``cfg.reference_cache`` (a `RunConfig`) for this run, or None (off, or it does not
    apply: the reason is logged). ``auto``: ``<out>/reference_cache`` — or, with ``shared_root``,
    ``<shared_root>/<identity digest>``, which every run with the same model and data shares — built (or
    resumed) when absent and rebuilt when it no longer matches (``path``: another place); a path: opened,
    refused (ConfigError) when it does not match. Under DDP every rank calls this: one builds, the others
    wait for it and read the same files."""
    option = cfg.reference_cache
    bcfg = cfg.balora_config()
    if option == "off":
        return None
    reason = None
    if bcfg is None or bcfg.lambda_consistency == 0:
        reason = "no consistency term"
    elif bcfg.reference == "teacher":
        reason = "balora.reference is 'teacher' (the cache holds the snapshot's outputs)"
    elif bcfg.task == "nlg":
        from balora.core.fused import supports_fused

        ok, why = supports_fused(_unwrap(model))
        reason = None if ok else f"the loss is computed from full logits ({why})"
    if reason is not None:
        logger.warning("reference_cache: %s: unused: %s; the reference forward runs at every step", option, reason)
        return None
    shard_size = 1024
    expected = reference_manifest(model, train, task=bcfg.task, temperature=bcfg.temperature, tokenizer=tokenizer,
                                  shard_size=shard_size)
    if option != "auto":
        return open_store(Path(option).expanduser(), expected)
    if path is None:
        path = Path(shared_root) / identity_digest(expected) if shared_root is not None else out / "reference_cache"
    # several processes (DDP ranks, compare shards) may get here at once: the build's lock lets one build
    batch_size = int(cfg.training_arguments().get("per_device_eval_batch_size", 8))
    store = build_reference_cache(model, train, collator, Path(path), batch_size=batch_size,
                                  temperature=bcfg.temperature, task=bcfg.task, tokenizer=tokenizer,
                                  shard_size=shard_size, device=device, manifest=expected, max_bytes=max_bytes,
                                  replace_stale=True)
    logger.info("reference_cache: %s", store.path)
    return store
