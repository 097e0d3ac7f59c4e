#!/usr/bin/env bash
# Build the cpu image and run it for real: against a private redis-server on the host, with a
# read-only root and the state volume, enqueue the sample photos, check every job is ok, and that
# SIGTERM (a stop) ends the container with status 0.
#   CONTAINER_ENGINE  docker or podman (default: whichever is installed)
#   BASE_IMAGE        the base image to build on (default: the Dockerfile's python:3.12-slim)
#   RUN_FLAGS         extra flags for `run` (default: --network host, to reach the host's redis-server)
# Needs the project's virtualenv for the host side (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${CONTAINER_ENGINE:-$(command -v docker || command -v podman || true)}
[ -n "$engine" ] || { echo "container_smoke: no docker or podman" >&2; exit 1; }
tag=localhost/imgworker:smoke
name=imgworker-smoke-$$
work=$(mktemp -d)
free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cleanup() {
  "$engine" rm -f "$name" >/dev/null 2>&1 || true
  "$engine" volume rm -f "$name" >/dev/null 2>&1 || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
redis_port=$(free_port)
trap cleanup EXIT

echo "== build (target cpu)"
started=$(date +%s)
format=(); [ "$(basename "$engine")" = podman ] && format=(--format docker)  # OCI would drop HEALTHCHECK
"$engine" build "${format[@]}" -t "$tag" --target cpu ${BASE_IMAGE:+--build-arg BASE_IMAGE="$BASE_IMAGE"} . \
  >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; exit 1; }
echo "built $tag in $(( $(date +%s) - started )) s: $("$engine" image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"

echo "== redis-server on 127.0.0.1:$redis_port"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --dir "$work" --logfile "$work/redis.log"
metrics_port=$(free_port)

echo "== run: read-only root, non-root user, state volume, SIGTERM on stop"
# shellcheck disable=SC2086
"$engine" run -d --name "$name" ${RUN_FLAGS---network host} --read-only --tmpfs /tmp \
  -v "$name:/var/lib/imgworker" \
  -e IMGWORKER_REDIS__URL="redis://127.0.0.1:$redis_port/0" -e IMGWORKER_METRICS__PORT="$metrics_port" \
  -e IMGWORKER_SHUTDOWN_GRACE_S=10 "$tag" >/dev/null
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1 && break
  [ "$("$engine" inspect -f '{{.State.Running}}' "$name")" = true ] || { "$engine" logs "$name"; exit 1; }
  sleep 0.2
done
echo "ready; running as uid $("$engine" exec "$name" id -u)"

echo "== enqueue the demo photos"
photos=$(.venv/bin/python -c 'from worker.core.settings import Settings; print(Settings().assets_dir / "demo")')
.venv/bin/python -m worker enqueue --redis-url "redis://127.0.0.1:$redis_port/0" --wait --json --timeout 600 \
  "$photos" >"$work/results.jsonl"
total=$(wc -l <"$work/results.jsonl")
ok=$(grep -c '"status": "ok"' "$work/results.jsonl" || true)
echo "$ok of $total jobs ok"

echo "== stop (SIGTERM)"
started=$(date +%s)
"$engine" stop -t 30 "$name" >/dev/null
code=$("$engine" inspect -f '{{.State.ExitCode}}' "$name")
echo "exit status $code after $(( $(date +%s) - started )) s"
"$engine" logs "$name" 2>&1 | tail -3
[ "$ok" -eq "$total" ] && [ "$total" -gt 0 ] && [ "$code" -eq 0 ] && echo "container smoke test: PASS" && exit 0
echo "container smoke test: FAIL" >&2
exit 1
