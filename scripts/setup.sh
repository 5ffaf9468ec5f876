#!/usr/bin/env bash
# Creates ./.venv (once) and installs balora with its dependencies.
# torch is pinned to the CPU build that lies on this machine's disk first, so that the looser
# requirement in pyproject.toml does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.balora-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  # tensorboard: the 7B preset (configs/nlg-metamath-llama2-7b.yaml) reports to it;
  # lm-eval: the second evaluation backend, tested against our harness on the same items;
  # quantization: bitsandbytes, whose 4-bit and 8-bit layers the tests train on this CPU;
  # deepspeed: ZeRO-2 / ZeRO-3, also run by the tests on this CPU
  .venv/bin/pip install -q -e ".[trl,assets,eval,report,tensorboard,lm-eval,quantization,deepspeed,test]"
  touch "$stamp"
fi
