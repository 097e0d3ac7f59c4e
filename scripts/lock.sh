#!/usr/bin/env bash
# Refresh the locks in requirements/ from pyproject.toml's ranges: every package pinned with its
# sha256 hashes, for any Python >= 3.11 on Linux, macOS or Windows (uv's universal resolution).
# Run it when pyproject.toml's dependencies change, or to take newer releases on purpose
# (scripts/test_latest.sh says first whether they pass); commit the result with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
uv_version=0.13.9
tools=${XDG_CACHE_HOME:-$HOME/.cache}/imgworker/uv-$uv_version
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q "uv==$uv_version"; }
compile() {  # $1 = lock file, then uv's extra options; setuptools builds the project itself
  local out=$1; shift
  echo "setuptools>=77" | "$tools/bin/uv" pip compile --quiet --universal --python-version 3.11 \
    --generate-hashes --custom-compile-command scripts/lock.sh "$@" pyproject.toml - -o "$out"
  echo "lock: $(grep -c '^[a-z]' "$out") packages in $out"
}
compile requirements/runtime.txt
compile requirements/dev.txt --extra dev
compile requirements/gpu.txt --extra gpu
