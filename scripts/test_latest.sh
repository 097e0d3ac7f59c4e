#!/usr/bin/env bash
# The whole suite against the newest releases that pyproject.toml's ranges allow, not the lock: run it
# before refreshing the lock (scripts/lock.sh) and now and then to see what upstream releases would
# break. It is not part of CI, so that an upstream release never blocks a landing. Its own
# virtualenv: .venv-latest. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test  # system packages and the test material
python3 -m venv --clear .venv-latest
.venv-latest/bin/python -m pip install -q --upgrade pip
.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
echo "test_latest: versions that differ from the lock:"
.venv-latest/bin/python - <<'PY'
import importlib.metadata, re
from packaging.requirements import Requirement
lines = re.findall(r"^([a-z0-9].*?) *\\?$", open("requirements/dev.txt").read(), re.M)
locked = {r.name: next(iter(r.specifier)).version for r in map(Requirement, lines) if not r.marker or r.marker.evaluate()}
for dist in importlib.metadata.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name in locked and locked[name] != dist.version:
        print(f"  {name} {locked[name]} -> {dist.version}")
PY
.venv-latest/bin/ruff check .
.venv-latest/bin/mypy
exec .venv-latest/bin/python -m pytest "$@"
