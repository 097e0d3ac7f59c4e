#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, lint, types, then the whole suite against real
# redis-server processes the tests start themselves. GPU tests skip, with their reason, without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
