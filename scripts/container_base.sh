#!/usr/bin/env bash
# A local stand-in for the Dockerfile's default base (python:3.12-slim) where no registry is
# reachable: Debian 12's minimal root with python3 and venv, trimmed as the slim images are (no apt
# lists or caches, docs, man pages or locales). Needs debootstrap and podman, as root. Idempotent.
#   scripts/container_base.sh [TAG]      (default localhost/python-slim:bookworm)
set -euo pipefail
tag=${1:-localhost/python-slim:bookworm}
podman image exists "$tag" && { echo "$tag exists"; exit 0; }
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "container_base: no Debian mirror in this machine's apt sources" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old "$root"/var/log/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
tar -C "$root" -c . | podman import --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "$tag ready: $(podman image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"
