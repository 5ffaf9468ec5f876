#!/usr/bin/env bash
# Regenerates the issue-13 comparisons under results/ from their committed specs, in the order of the
# protocol (NLU main, NLG testbed, then the longer RT budget, ablation, sensitivity and the lab probes),
# and then the README / docs/results.md headline. Resumable: finished cells are skipped, a cell killed
# mid-training resumes from its checkpoint. Each spec runs in BALORA_PROCS processes (default 2) of
# BALORA_THREADS torch threads (default 1: on a 2-core CPU, two one-thread processes beat one
# two-thread process 4-7x); the processes share the grid cell by cell.
#
#   bash experiments/run-all.sh                 # everything still missing
#   bash experiments/run-all.sh nlg-privacy-policy lab:noise-selected   # only these
set -euo pipefail
cd "$(dirname "$0")/.."
PROCS="${BALORA_PROCS:-2}"
THREADS="${BALORA_THREADS:-1}"
export OMP_NUM_THREADS="$THREADS"

ORDER=(nlu-main-rotten-tomatoes nlu-main-privacy-policy nlg-privacy-policy nlu-main-rotten-tomatoes-600
       nlu-ablation-rotten-tomatoes nlu-sensitivity-rotten-tomatoes
       lab:imbalance-selected lab:noise-selected lab:bias-selected)
if [ "$#" -gt 0 ]; then ORDER=("$@"); fi

run_spec() {  # one spec in PROCS processes; fails if any of them fails
    local name="$1" pids=() i
    for i in $(seq 1 "$PROCS"); do
        if [[ "$name" == lab:* ]]; then
            local spec="${name#lab:}" kind="${name#lab:}"
            kind="${kind%%-*}"  # imbalance-selected -> imbalance
            # the processes share the cells (imbalance, noise) or the models to evaluate (bias) by claims
            .venv/bin/balora lab "$kind" "experiments/lab/$spec.yaml" --threads "$THREADS" --no-progress &
        else
            .venv/bin/balora compare "experiments/$name.yaml" --shard "$i/$PROCS" --threads "$THREADS" \
                --no-progress &
        fi
        pids+=("$!")
    done
    for i in "${pids[@]}"; do wait "$i"; done
}

for name in "${ORDER[@]}"; do
    echo "== $name ($(date -u +%H:%M))"
    run_spec "$name"
done
.venv/bin/python experiments/fill_headline.py
