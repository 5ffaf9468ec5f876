#!/usr/bin/env bash
# The test command: sets up ./.venv, lints (ruff, configured in pyproject.toml), then runs the
# default (fast, offline) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks experiments scripts
exec .venv/bin/python -m pytest -q "$@"
