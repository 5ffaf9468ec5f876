"""The documentation stays true: links resolve, nothing points outside the repository, every `balora`
sub-command shown in a code block exists, and the README's Python example runs (on a tiny model)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SCANNED_DIRS = ("README.md", "docs", "src", "tests", "experiments", "scripts")
# Built from parts so that this file does not contain what it looks for.
FORBIDDEN = ("shared" + "/spec", ".." + "/shared", "ba-lora" + ".md")

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*).*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(lines outside fenced code blocks, [(language, lines) of each fenced block])."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence: str | None = None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(2)
                blocks.append((match.group(3).lower(), []))
            else:
                prose.append(line)
        elif match and match.group(2).startswith(fence) and not match.group(3):
            fence = None
        else:
            blocks[-1][1].append(line)
    return prose, blocks


def links(path: Path) -> list[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found: list[str] = []
    for line in prose:
        found += _LINK.findall(_INLINE_CODE.sub("", line))
    return found


def github_anchors(path: Path) -> set[str]:
    """The heading anchors GitHub generates for a Markdown file (duplicates get -1, -2, ...)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose:
        match = _HEADING.match(line)
        if not match:
            continue
        text = _INLINE_CODE.sub(lambda m: m.group(2), match.group(2))
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links() -> list[tuple[Path, str]]:
    out = []
    for doc in DOC_FILES:
        for target in links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s), mailto, ...; anchors within the page
            out.append((doc, target))
    return out


# ---------------------------------------------------------------- links
def test_docs_exist_and_have_links():
    assert (ROOT / "docs" / "method.md").is_file()
    assert len(relative_links()) > 50  # the parser finds the links (a broken regex would pass vacuously)


@pytest.mark.parametrize("doc", DOC_FILES, ids=_rel)
def test_relative_links_resolve(doc):
    broken = []
    for source, target in relative_links():
        if source != doc:
            continue
        path_part = target.split("#", 1)[0]
        resolved = (doc.parent / path_part).resolve()
        if not resolved.exists():
            broken.append(f"{target} (no such file or folder)")
        elif ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{_rel(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOC_FILES, ids=_rel)
def test_anchors_into_markdown_files_exist(doc):
    broken = []
    for target in links(doc):
        if "#" not in target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue
        path_part, anchor = target.split("#", 1)  # "#anchor" alone: a heading of this page
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if resolved.suffix == ".md" and resolved.is_file() and anchor not in github_anchors(resolved):
            broken.append(target)
    assert not broken, f"{_rel(doc)}: no such heading: " + "; ".join(broken)


def test_github_anchor_rules():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.md"
        page.write_text('# 6. Earlier formulations (variant "v1")\n\n```bash\n# not a heading\n```\n'
                        "## The paper's `numbers`, and why\n## A\n## A\n", encoding="utf-8")
        assert github_anchors(page) == {"6-earlier-formulations-variant-v1", "the-papers-numbers-and-why",
                                        "a", "a-1"}


# ---------------------------------------------------------------- nothing outside the repository
def _scanned_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SCANNED_DIRS],
            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
        files = [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the folders
        files = [ROOT / "README.md"] + [p for d in SCANNED_DIRS[1:] for p in (ROOT / d).rglob("*")]
    def skipped(part: str) -> bool:
        return part.endswith(".egg-info") or part == "__pycache__"

    return sorted({f for f in files if f.is_file() and not any(map(skipped, f.relative_to(ROOT).parts))})


def test_nothing_names_a_path_outside_the_repository():
    files = _scanned_files()
    assert any(f.name == "method.md" for f in files)
    offending = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (plots, gzip)
        for needle in FORBIDDEN:
            for lineno, line in enumerate(text.splitlines(), 1):
                if needle in line:
                    offending.append(f"{_rel(path)}:{lineno}: {needle}")
    assert not offending, "a clone has no such path:\n" + "\n".join(offending)


# ---------------------------------------------------------------- the commands shown exist
_COMMAND = re.compile(r"(?:^|[\s;&|(/])balora\s+([a-z][a-z0-9_-]*)")
_NOT_SHELL = {"python", "py", "yaml", "yml", "json", "toml"}


def documented_subcommands() -> dict[str, str]:
    """First word after `balora ` in the shell code blocks of README.md and docs/ → a file showing it."""
    found: dict[str, str] = {}
    for doc in DOC_FILES:
        _, blocks = split_fences(doc.read_text(encoding="utf-8"))
        for language, lines in blocks:
            if language in _NOT_SHELL:
                continue
            for line in lines:
                for sub in _COMMAND.findall(line):
                    found.setdefault(sub, _rel(doc))
    return found


def test_documented_subcommands_are_found():
    assert {"train", "export", "info", "assets", "demo", "eval", "compare", "lab"} <= set(documented_subcommands())


@pytest.mark.parametrize("sub", sorted(documented_subcommands()))
def test_documented_subcommand_has_help(sub, capsys):
    from balora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([sub, "--help"])
    where = documented_subcommands()[sub]
    assert exit_info.value.code == 0, f"`balora {sub}` (shown in {where}) is not a balora sub-command"
    assert f"balora {sub}" in capsys.readouterr().out


def test_top_level_help_and_version(capsys):
    from balora.cli import build_parser, main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    capsys.readouterr()
    if not any("--version" in action.option_strings for action in build_parser()._actions):
        pytest.skip("the parser has no --version")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("balora ")


def test_verbose_before_or_after_the_subcommand():
    from balora.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "info", "runs/x"]).verbose
    assert parser.parse_args(["info", "-v", "runs/x"]).verbose
    assert not parser.parse_args(["info", "runs/x"]).verbose


# ---------------------------------------------------------------- the README's Python example
def readme_python_example() -> str:
    _, blocks = split_fences((ROOT / "README.md").read_text(encoding="utf-8"))
    code = next(("\n".join(lines) for language, lines in blocks if language == "python"), None)
    assert code is not None, "README.md has no ```python block"
    return code


def test_readme_python_example_runs(tmp_path, monkeypatch):
    from conftest import make_tiny_llama
    from transformers import TrainingArguments, default_data_collator

    length, prompt = 12, 4
    train = []
    for i in range(8):
        ids = [(i + 3 * j) % 90 + 3 for j in range(length)]
        train.append({"input_ids": ids, "attention_mask": [1] * length,
                      "labels": [-100] * prompt + ids[prompt:]})
    namespace = {
        "base_model": make_tiny_llama(),
        "training_args": TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2,
                                           per_device_train_batch_size=2, logging_steps=1, report_to=[],
                                           save_strategy="no", use_cpu=True, disable_tqdm=True),
        "train": train,
        "collator": default_data_collator,
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)

    adapter, converted = tmp_path / "out" / "adapter", tmp_path / "out" / "lora_converted"
    for folder in (adapter, converted):
        assert (folder / "adapter_config.json").is_file(), folder
        assert (folder / "adapter_model.safetensors").is_file(), folder
    # docs/guide/python.md: the converted PiSSA adapter is a plain LoRA of rank 2r
    r = json.loads((adapter / "adapter_config.json").read_text())["r"]
    assert json.loads((converted / "adapter_config.json").read_text())["r"] == 2 * r

    # docs/guide/python.md, "What is logged"
    logged = [row for row in namespace["trainer"].state.log_history if "task_loss" in row]
    assert logged, "no training log row with task_loss"
    documented = {"task_loss"} | {f"balora/{t}" for t in ("consistency", "diversity", "svd")} \
        | {f"balora/weighted_{t}" for t in ("consistency", "diversity", "svd")} \
        | {f"balora/lambda_{t}" for t in ("consistency", "diversity", "svd")}
    assert documented <= set(logged[-1]), documented - set(logged[-1])
