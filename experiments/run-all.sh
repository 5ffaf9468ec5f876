#!/usr/bin/env bash
# Regenerates every comparison under results/ from its committed spec (resumable: finished
# cells are skipped). Run it in N shells at once to use N cores or GPUs: the processes share the
# grids cell by cell. One torch thread per process is fastest on a shared CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
for spec in nlu-rotten-tomatoes nlu-ablation nlu-sensitivity nlu-boolq nlg-asdiv; do
    .venv/bin/balora compare "experiments/$spec.yaml" --threads "${BALORA_THREADS:-1}" --no-progress
done
