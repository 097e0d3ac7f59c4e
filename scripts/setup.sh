#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine needs: system packages, the virtualenv, the model and photos.
# Idempotent and quick when already done. Used by scripts/demo.sh and scripts/test.sh.
#   scripts/setup.sh          the demo: the package, redis-server, the model, the demo's photos
#   scripts/setup.sh --test   also the dev tools, podman, and the tests' material (Pillow's edge cases)
set -euo pipefail
cd "$(dirname "$0")/.."
test_material=0
[ "${1:-}" = "--test" ] && test_material=1

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v curl >/dev/null || missing+=(curl)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v dpkg-deb >/dev/null || missing+=(dpkg)  # unpacks the demo's photos from Debian's opencv-doc
if [ $test_material = 1 ]; then
  command -v promtool >/dev/null || missing+=(prometheus)
  # the container tests build images (no registry needed) and run compose.yaml with podman-compose
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ -x /usr/lib/cni/dnsname ] || missing+=(golang-github-containernetworking-plugin-dnsname)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python >= 3.11 is required" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Exactly the locked versions (hashes checked), then the project itself without touching them:
# what a fresh machine installs never drifts from what CI tested (scripts/lock.sh refreshes them).
lock=requirements/runtime.txt; [ $test_material = 1 ] && lock=requirements/dev.txt
stamp=.venv/.installed-$(sha256sum "$lock" pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing $lock and the package into .venv"
  .venv/bin/python -m pip install -q --require-hashes -r "$lock"
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  rm -f .venv/.installed-* && touch "$stamp"
fi
if [ $test_material = 1 ]; then
  .venv/bin/python -m worker fetch-assets --test-material
else
  .venv/bin/python -m worker fetch-assets
fi
