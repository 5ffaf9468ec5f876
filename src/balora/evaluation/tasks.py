"""The names of the evaluation tasks (a light module: the command line lists them without loading
torch). The harness (`balora.evaluation.harness`) runs them."""

TASKS = ("gsm8k", "asdiv", "math", "humaneval", "forgetting", "crows_pairs", "stereoset", "bbq", "boolq",
         "privacy_policy", "piqa")
GENERATIVE = frozenset({"gsm8k", "asdiv", "math", "humaneval"})
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "asdiv": 256, "math": 256, "humaneval": 384}
