"""Child process for ``math_answers.answers_equal(symbolic=True)``; run as a script, not imported.

Protocol: one JSON object per line on stdin, ``{"a": text, "b": text}`` where both texts come from
``latex_to_sympy_text`` (already whitelisted), or ``{"mode": "math_verify", "gold": latex, "pred": latex,
"timeout": seconds}`` for Hugging Face's ``math-verify`` (its own parser: LaTeX through antlr, plain
expressions only of digits and operators); one JSON line back, ``{"equal": true|false}`` or
``{"equal": null, "error": "..."}``. Prints ``ready`` once sympy (and math-verify, when installed) is
imported. math-verify's timeouts use ``signal.alarm``, which works here: this is a main thread.
"""

from __future__ import annotations

import json
import resource
import sys


def _cap_memory(limit_bytes: int = 2 << 30) -> None:
    # A pathological expression should fail with MemoryError here, not swap the host.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))


def main() -> None:
    _cap_memory()
    # after the cap, so that sympy's own import counts against it too
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    names = ["Integer", "Float", "Rational", "Symbol", "Function", "Tuple", "sqrt", "sin", "cos",
             "tan", "cot", "sec", "csc", "asin", "acos", "atan", "log", "exp", "pi", "oo"]
    # No builtins: parse_expr evals its translated text, so the namespace is kept to sympy atoms.
    namespace = {name: getattr(sympy, name) for name in names}
    namespace["__builtins__"] = {}

    def parse(text: str):
        return parse_expr(text, local_dict={}, global_dict=dict(namespace),
                          transformations=transformations)

    def scalar_equal(a, b) -> bool:
        diff = sympy.simplify(a - b)
        if diff == 0:
            return True
        symbols = sorted(diff.free_symbols, key=str)
        # simplify() misses some identities; agreement at a few irrational-ish points decides.
        points = [{s: 0.37 + 0.61 * j + 1.13 * trial for j, s in enumerate(symbols)}
                  for trial in range(3 if symbols else 1)]
        for point in points:
            value = complex(sympy.N(diff.subs(point)))
            scale = max(1.0, abs(complex(sympy.N(b.subs(point)))))
            if abs(value) > 1e-9 * scale:
                return False
        return True

    def equal(a, b) -> bool:
        if isinstance(a, tuple) or isinstance(b, tuple):
            return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                    and all(scalar_equal(x, y) for x, y in zip(a, b)))
        return scalar_equal(a, b)

    try:
        import math_verify
    except ImportError:
        math_verify = None

    def mv_parse(text: str, timeout: int) -> list:
        text = text.strip()
        delimited = any(d in text for d in ("$", "\\(", "\\["))
        parsed = math_verify.parse(text if delimited else f"${text}$", parsing_timeout=timeout)
        return parsed or math_verify.parse(text, parsing_timeout=timeout)

    def mv_equal(req: dict) -> bool:
        if math_verify is None:
            raise ImportError("math-verify is not installed")
        timeout = max(1, int(req.get("timeout", 5)))
        gold, pred = mv_parse(req["gold"], timeout), mv_parse(req["pred"], timeout)
        return bool(gold) and bool(pred) and math_verify.verify(gold, pred, timeout_seconds=timeout)

    print("ready", flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req.get("mode") == "math_verify":
                reply = {"equal": bool(mv_equal(req))}
            else:
                reply = {"equal": bool(equal(parse(req["a"]), parse(req["b"])))}
        except Exception as exc:  # any parse/simplify failure means "cannot show equal"
            reply = {"equal": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
