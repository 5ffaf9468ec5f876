"""Evaluation harness: math answer scoring, sandboxed code execution, classification metrics.

Submodules are imported lazily by callers (``from balora.evaluation.math_answers import ...``)
so that importing the package stays cheap and pulls in neither sympy nor scikit-learn.
"""
