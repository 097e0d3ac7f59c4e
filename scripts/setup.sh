#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine needs: system packages, the virtualenv, the model and photos.
# Idempotent and quick when already done. Used by scripts/demo.sh and scripts/test.sh.
#   scripts/setup.sh          the demo: the package, redis-server, the model, sample photos (PyPI only)
#   scripts/setup.sh --test   also the dev tools and the tests' material (Debian 12's opencv-doc, Pillow's edge cases)
set -euo pipefail
cd "$(dirname "$0")/.."
test_material=0
[ "${1:-}" = "--test" ] && test_material=1

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v curl >/dev/null || missing+=(curl)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ $test_material = 1 ]; then
  command -v dpkg-deb >/dev/null || missing+=(dpkg)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v podman >/dev/null || missing+=(podman)  # podman-compose validates the compose files
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
extra=""; [ $test_material = 1 ] && extra="[dev]"
stamp=.venv/.installed-$(cat pyproject.toml <(echo "$extra") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the package${extra:+ and its dev tools} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".$extra"
  rm -f .venv/.installed-* && touch "$stamp"
fi
if [ $test_material = 1 ]; then
  .venv/bin/python -m worker fetch-assets --test-material
else
  .venv/bin/python -m worker fetch-assets
fi
