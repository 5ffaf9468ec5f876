"""Final-answer extraction and equivalence for GSM8K / MATH-style generations.

Equivalence rules (documented once here, relied on by the tests):

* Numbers compare exactly as fractions after normalisation: thousands separators, ``$``/``\\$``,
  surrounding LaTeX math delimiters, trailing punctuation and trailing unit words
  ("9 apples", "5 \\text{cm}") are dropped; "3/4", "\\frac{3}{4}", "0.75" are all 3/4.
* A percent sign is treated as a *unit* and dropped: "50%" == "50", and "50%" != "0.5".
  GSM8K golds are plain numbers written in the unit the question asks for (a question asking
  "what percentage" has gold "50"), and the reference MATH normaliser also strips "\\%"; accepting
  0.5 as well would turn real unit mistakes into passes.
* Non-numeric answers compare as normalised LaTeX text, and with ``symbolic=True`` through
  Hugging Face's ``math-verify`` (``pip install 'balora[eval]'``): intervals with their open/closed
  ends, sets and unordered lists ("1, 2" = "2, 1"), ordered tuples, matrices, ``\\log_2 8`` = 3, ...
  Without math-verify, the older sympy comparison of :func:`latex_to_sympy_text` is used, with a
  warning: it reads brackets as parentheses ("[0,1]" = "[0,1)") and has no sets, matrices or logs
  with a base (see :func:`answers_equal`, ``grader``).
"""

from __future__ import annotations

import atexit
import gzip
import importlib.util
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

__all__ = [
    "GRADERS",
    "MATH_VERIFY_MISSING",
    "answers_equal",
    "default_gsm8k_path",
    "extract_answer",
    "gsm8k_gold",
    "latex_to_sympy_text",
    "load_gsm8k",
    "math_verify_available",
    "normalize_number",
    "score_math",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- number syntax

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
# The look-behind keeps digits glued to words ("x2", "v1.5") and the "3" of "5-3" from being
# read as "-3"; a sign is only taken when it is not preceded by a word character.
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>[-\u2212])?(?:\\?\$\s?)?(?P<num>{_DEC}(?:\s*/\s*{_DEC})?)(?!\d)"
    rf"(?P<pct>\s?\\?%)?"
)
# What may follow a number and still leave it "just a number": units as words after a space or
# in \text{...}, percent, degrees, trailing punctuation.
_UNIT_TAIL = re.compile(
    r"\s*(?:\\?%|\^\{?\\circ\}?|\u00b0|\\(?:text|mbox|mathrm)\{[^{}]*\}"
    r"|\s[A-Za-z][A-Za-z'\- ]*)?[\s.,;:!?]*\s*"
)
_FRAC = re.compile(r"^(?P<sign>-)?\\[dt]?frac\{(?P<a>[^{}]+)\}\{(?P<b>[^{}]+)\}$")
_TRAILING_PUNCT = " \t\n.,;:!?"


def _clean_number(sign: str | None, num: str) -> str:
    return ("-" if sign else "") + re.sub(r"[\s,]", "", num)


def _strip_wrappers(s: str) -> str:
    """Remove math delimiters and LaTeX spacing that never change a value."""
    s = s.strip().strip(_TRAILING_PUNCT)
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left): len(s) - len(right)].strip()
    s = s.replace("\\!", "").replace("{,}", ",").replace("\\,", "")
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, but "\\ " a matrix row break and a space
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"^\\displaystyle\s*", "", s)
    return s.strip().strip(_TRAILING_PUNCT).strip()


def _strict_number(text: str) -> str | None:
    """Canonical numeric string if ``text`` is a single number (plus units), else None."""
    s = _strip_wrappers(text)
    if s.startswith("+"):
        s = s[1:]
    m = _FRAC.match(s)
    if m:
        a, b = _strict_number(m["a"]), _strict_number(m["b"])
        if a is None or b is None or "/" in a or "/" in b:
            return None
        return f"{'-' if m['sign'] else ''}{a}/{b}".replace("--", "")
    m = _NUMBER.match(s)
    if m is None or not _UNIT_TAIL.fullmatch(s, m.end()):
        return None
    return _clean_number(m["sign"], m["num"])


def normalize_number(s: str | None) -> Fraction | None:
    """Exact value of a numeric answer string ("1,234", "$5.50", "3/4", "\\frac{1}{2}", "50%",
    "9 apples"); None when ``s`` is not a single number. Percent is a unit: "50%" -> 50."""
    if s is None:
        return None
    canon = _strict_number(s)
    if canon is None:
        return None
    try:
        if "/" in canon:
            num, den = canon.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(canon)
    except (ValueError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------- extraction

_HASHES = re.compile(r"####\s*(?P<rest>[^\n]*)")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        # Unbalanced (generation cut off): try an earlier box.
    return None


def _last_number(text: str) -> str | None:
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return _clean_number(m["sign"], m["num"])


def _clean_segment(segment: str, *, lenient: bool) -> str | None:
    """Turn the text after a marker into an answer.

    ``lenient`` (for "the answer is ...") takes a leading number even if prose follows it;
    strict mode (boxed, ####) only accepts a number that is the whole segment, and otherwise keeps
    the LaTeX/text as is so that symbolic answers such as ``2\\sqrt{2}`` survive.
    """
    boxed = _last_boxed(segment)
    if boxed is not None:
        segment = boxed
    s = _strip_wrappers(segment)
    if not s:
        return None
    if "=" in s and not s.endswith("="):
        s = _strip_wrappers(s.rsplit("=", 1)[1])
    number = _strict_number(s)
    if number is not None:
        return number
    if lenient:
        m = _NUMBER.match(s)
        if m is not None:
            return _clean_number(m["sign"], m["num"])
        if not re.search(r"[\\^{}]", s):
            last = _last_number(s)
            if last is not None:
                return last
    return s


def extract_answer(completion: str) -> str | None:
    """Final answer of a generation, by priority: ``#### X``; ``the answer is[:] X``;
    the last ``\\boxed{X}``; else the last number in the text. Numbers come back canonical
    (no ``$``, commas, units or ``%``; ``-3``, ``2.5``, ``3/4``); None if nothing is found."""
    if not completion:
        return None
    hashes = list(_HASHES.finditer(completion))
    if hashes:
        answer = _clean_segment(hashes[-1]["rest"], lenient=False)
        if answer is not None:
            return answer
    markers = list(_ANSWER_IS.finditer(completion))
    if markers:
        rest = completion[markers[-1].end():]
        lines = [ln for ln in rest.split("\n") if ln.strip()]
        if lines:
            # A boxed answer may span lines; otherwise the answer is the first non-empty line.
            segment = rest if "\\boxed" in lines[0] or "\\fbox" in lines[0] else lines[0]
            answer = _clean_segment(segment, lenient=True)
            if answer is not None:
                return answer
    boxed = _last_boxed(completion)
    if boxed is not None:
        answer = _clean_segment(boxed, lenient=False)
        if answer is not None:
            return answer
    return _last_number(completion)


def gsm8k_gold(answer_field: str) -> str:
    """Gold answer of a GSM8K ``answer`` field: the text after the last ``####``, commas removed."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer field has no '####' marker: {answer_field[-80:]!r}")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


# ---------------------------------------------------------------- symbolic equivalence

_FUNCS = {"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan",
          "log", "ln", "exp"}
_CONSTS = {"pi": "pi", "infty": "oo", "infinity": "oo"}
_BINOPS = {"cdot": "*", "times": "*", "div": "/", "pm": "+", "cdotp": "*"}
_DROP_WITH_ARG = {"text", "textbf", "textit", "mbox", "operatorname*"}
_KEEP_ARG = {"mathrm", "mathbf", "mathit", "boldsymbol", "operatorname"}
_IGNORED = {"left", "right", "displaystyle", "quad", "qquad", "circ", "degree", "big", "Big"}
_ALLOWED_NAMES = _FUNCS | {"pi", "oo"}


class _Unsupported(ValueError):
    pass


def _read_group(s: str, i: int) -> tuple[str, int]:
    """Argument starting at ``s[i]``: a balanced ``{...}`` group or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise _Unsupported("missing argument")
    if s[i] != "{":
        if s[i] == "\\":
            m = re.match(r"\\[A-Za-z]+", s[i:])
            if m:
                return s[i: i + m.end()], i + m.end()
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1: j], j + 1
    raise _Unsupported("unbalanced braces")


def _convert(s: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([A-Za-z]+\*?|.)", s[i:])
            name = m.group(1)
            i += m.end()
            if name in ("frac", "dfrac", "tfrac"):
                a, i = _read_group(s, i)
                b, i = _read_group(s, i)
                out.append(f"(({_convert(a)})/({_convert(b)}))")
            elif name == "sqrt":
                index = None
                if i < len(s) and s[i] == "[":
                    end = s.index("]", i)
                    index, i = s[i + 1: end], end + 1
                a, i = _read_group(s, i)
                out.append(f"sqrt({_convert(a)})" if index is None
                           else f"(({_convert(a)})**(1/({_convert(index)})))")
            elif name in _FUNCS:
                out.append("log" if name == "ln" else
                           name.replace("arc", "a") if name.startswith("arc") else name)
            elif name in _CONSTS:
                out.append(f" {_CONSTS[name]} ")
            elif name in _BINOPS:
                out.append(_BINOPS[name])
            elif name in _DROP_WITH_ARG:
                _, i = _read_group(s, i)
            elif name in _KEEP_ARG:
                a, i = _read_group(s, i)
                out.append(f"({_convert(a)})")
            elif name in _IGNORED or name in (",", ";", ":", "!", " ", "%", "$"):
                continue
            elif name in ("{", "}"):
                out.append({"{": "(", "}": ")"}[name])
            else:
                raise _Unsupported(f"LaTeX command \\{name}")
        elif c == "{":
            a, i = _read_group(s, i)
            out.append(f"({_convert(a)})")
        elif c == "^":
            a, i = _read_group(s, i + 1)
            out.append(f"**({_convert(a)})")
        elif c in "%$":
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def latex_to_sympy_text(latex: str) -> str | None:
    """Light LaTeX -> sympy-parsable text (\\frac, \\sqrt, ^, \\cdot, \\pi, \\left/\\right, ...).

    Used instead of ``sympy.parsing.latex`` because that needs ``antlr4-python3-runtime``, which
    is not installed in this environment (and is pinned to a sympy-specific version).
    Returns None for anything outside that subset. The output only contains digits, operators,
    brackets, single-letter symbols and a whitelist of function names, because sympy's
    ``parse_expr`` ends in ``eval`` and must never see arbitrary model output.
    """
    s = _strip_wrappers(latex)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    try:
        text = _convert(s)
    except (_Unsupported, AttributeError, ValueError):
        return None
    text = text.replace("[", "(").replace("]", ")")
    if not text.strip() or not re.fullmatch(r"[0-9A-Za-z+\-*/().,\s]*", text):
        return None
    if re.search(r"\.\s*[A-Za-z(]", text):  # attribute access / method calls never reach eval
        return None

    def split_name(m: re.Match) -> str:
        # Unknown multi-letter runs are products of single-letter symbols ("xy" -> x*y); this
        # also keeps Python keywords and builtins out of what reaches eval.
        word = m.group(0)
        return word if word in _ALLOWED_NAMES else "*".join(word)

    return re.sub(r"[A-Za-z]+", split_name, text).strip()


class _SympyWorker:
    """A long-lived child process that compares expressions with sympy.

    Why a subprocess rather than ``signal.alarm``: alarms only work in the main thread (scoring
    may run in worker threads) and cannot interrupt long C-level work (huge integer powers in GMP),
    while a child can always be killed, and a runaway allocation stays inside it (it also caps its
    own address space). Keeping one child alive pays sympy's ~1 s import once, not per comparison.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        script = Path(__file__).with_name("_sympy_worker.py")
        proc = subprocess.Popen(
            [sys.executable, "-I", str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1, close_fds=True,
        )
        # sympy's import is not charged to the first comparison's timeout.
        line = self._readline(proc, 60.0)
        if line != "ready":
            self._stop(proc)
            raise RuntimeError(f"sympy worker failed to start (said {line!r})")
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        return proc.stdout.readline().strip()

    def compare(self, a: str, b: str, timeout: float) -> bool | None:
        """True/False, or None when the comparison timed out or failed."""
        return self.request({"a": a, "b": b}, timeout)

    def math_verify(self, gold: str, pred: str, timeout: float) -> bool | None:
        """math-verify's verdict on (gold, pred), or None when it timed out or failed."""
        return self.request({"mode": "math_verify", "gold": gold, "pred": pred, "timeout": timeout}, timeout + 1.0)

    def request(self, payload: dict[str, Any], timeout: float) -> bool | None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(json.dumps(payload) + "\n")
                proc.stdin.flush()
            except BrokenPipeError:
                self._kill()
                return None
            line = self._readline(proc, timeout)
            if not line:
                self._kill()  # stuck in simplify (or died): restart on the next call
                return None
            reply = json.loads(line)
            return reply.get("equal")

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    def _kill(self) -> None:
        if self._proc is not None:
            self._stop(self._proc)
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _SympyWorker()
atexit.register(_WORKER.close)


def _canonical_text(s: str) -> str:
    s = _strip_wrappers(s)
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    return re.sub(r"\s+", "", s)


GRADERS = ("auto", "math-verify", "balora")
MATH_VERIFY_MISSING = ("math-verify is not installed; symbolic math answers (MATH) are graded with it: "
                       "pip install 'balora[eval]' (or pip install math-verify)")
_warned_fallback = [False]


def math_verify_available() -> bool:
    """Whether Hugging Face's ``math-verify`` (the ``eval`` extra) can be imported."""
    return importlib.util.find_spec("math_verify") is not None


def _unbox(s: str) -> str:
    boxed = _last_boxed(s)
    return boxed if boxed is not None else s


def answers_equal(pred: str | None, gold: str | None, *, symbolic: bool = False,
                  timeout: float = 5.0, grader: str = "auto") -> bool:
    """Whether a predicted answer matches the gold one.

    ``grader="auto"`` (the default): numbers compare exactly here (see the module doc for units,
    percent and separators; the GSM8K/ASDiv path, no child process); then the normalised LaTeX
    strings (``\\boxed{}`` removed); then, with ``symbolic=True``, Hugging Face's math-verify
    (intervals, sets and unordered lists, tuples, matrices, logarithms, ...), or, when it is not
    installed, the sympy comparison below with a warning naming the extra.

    ``grader="math-verify"``: math-verify alone (ImportError naming the extra when it is missing).
    ``grader="balora"``: the older grader only: both sides converted by :func:`latex_to_sympy_text` and
    compared with sympy (``simplify(a - b) == 0``, then numeric evaluation).

    Both symbolic graders run in a killable child process; a comparison that exceeds ``timeout``
    counts as not equal.
    """
    if grader not in GRADERS:
        raise ValueError(f"grader must be one of {', '.join(GRADERS)}, got {grader!r}")
    if pred is None or gold is None:
        return False
    if grader == "math-verify":
        if not math_verify_available():
            raise ImportError(MATH_VERIFY_MISSING)
        return bool(_WORKER.math_verify(gold, pred, timeout))
    p, g = normalize_number(pred), normalize_number(gold)
    if p is not None and g is not None:
        return p == g
    if grader == "auto":
        pred, gold = _unbox(pred), _unbox(gold)
        p, g = normalize_number(pred), normalize_number(gold)
        if p is not None and g is not None:
            return p == g
    if _canonical_text(pred) == _canonical_text(gold):
        return True
    if not symbolic:
        return False
    if grader == "auto":
        if math_verify_available():
            return bool(_WORKER.math_verify(gold, pred, timeout))
        if not _warned_fallback[0]:
            _warned_fallback[0] = True
            logger.warning("%s; falling back to balora's sympy grader (no intervals, sets, matrices)",
                           MATH_VERIFY_MISSING)
    a, b = latex_to_sympy_text(pred), latex_to_sympy_text(gold)
    if a is None or b is None:
        return False
    return bool(_WORKER.compare(a, b, timeout))


# ---------------------------------------------------------------- scoring and data

def score_math(records: Iterable[Mapping[str, Any]], *, symbolic: bool = False,
               timeout: float = 5.0, grader: str = "auto") -> dict[str, Any]:
    """Accuracy over records with ``completion`` and ``gold`` (and optionally ``prompt`` or
    ``question``); returns ``{"accuracy", "correct", "total", "records": [...]}`` where each
    record holds prompt, completion, extracted, gold, correct."""
    out: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if "completion" not in rec or "gold" not in rec:
            raise KeyError(f"record {i} needs 'completion' and 'gold' fields, has {sorted(rec)}")
        extracted = extract_answer(rec["completion"])
        gold = str(rec["gold"])
        out.append({
            "prompt": rec.get("prompt", rec.get("question")),
            "completion": rec["completion"],
            "extracted": extracted,
            "gold": gold,
            "correct": answers_equal(extracted, gold, symbolic=symbolic, timeout=timeout, grader=grader),
        })
    correct = sum(r["correct"] for r in out)
    return {"accuracy": correct / len(out) if out else 0.0, "correct": correct,
            "total": len(out), "records": out}


def default_gsm8k_path() -> Path:
    """``$BALORA_GSM8K`` if set, else the GSM8K test set shipped with balora (1,319 problems, MIT
    licence, ``balora/evaluation/data/gsm8k_test.jsonl.gz``)."""
    env = os.environ.get("BALORA_GSM8K")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data" / "gsm8k_test.jsonl.gz"


def load_gsm8k(path: str | os.PathLike | None = None, limit: int | None = None
               ) -> list[dict[str, str]]:
    """GSM8K rows ``{question, answer, gold}`` from a JSONL(.gz) file (default:
    :func:`default_gsm8k_path`); if no path is given and that file is absent, the hub's
    ``openai/gsm8k`` (main, test) through ``datasets``."""
    file = Path(path) if path is not None else default_gsm8k_path()
    rows: list[dict[str, str]] = []
    if file.exists():
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append({"question": row["question"], "answer": row["answer"]})
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{file}:{lineno}: not a GSM8K row ({exc})") from exc
    elif path is not None:
        raise FileNotFoundError(f"GSM8K file not found: {file}")
    else:
        from datasets import load_dataset  # optional; only for the hub fallback

        split = load_dataset("openai/gsm8k", "main", split="test")
        for row in split:
            if limit is not None and len(rows) >= limit:
                break
            rows.append({"question": row["question"], "answer": row["answer"]})
    for row in rows:
        row["gold"] = gsm8k_gold(row["answer"])
    return rows
