#!/usr/bin/env bash
# The demo: set up, make sure a Redis answers on 127.0.0.1:6379 (start one if not), run a worker on
# the CPU backend, enqueue the sample photos, print a summary of the results and the metrics URL.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

redis_url=${IMGWORKER_REDIS__URL:-redis://127.0.0.1:6379/0}
port=${IMGWORKER_METRICS__PORT:-9400}
if ! redis-cli -u "$redis_url" ping >/dev/null 2>&1; then
  echo "demo: no Redis at $redis_url; starting a local redis-server on 6379"
  redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes >/dev/null
  redis_url=redis://127.0.0.1:6379/0
  for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

.venv/bin/python -m worker run --redis-url "$redis_url" --metrics-port "$port" &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 $worker 2>/dev/null || { echo "demo: the worker exited" >&2; exit 1; }
  sleep 0.2
done

photos=$(.venv/bin/python -c 'from worker.settings import Settings; print(Settings().assets_dir / "photos")')
.venv/bin/python -m worker enqueue --redis-url "$redis_url" --wait --timeout 600 "$photos"

echo
echo "metrics: http://127.0.0.1:$port/metrics   health: /healthz   readiness: /readyz"
curl -fs "http://127.0.0.1:$port/metrics" | grep -E '^imgworker_(jobs_completed_total|batch_size_(count|sum)|inference_seconds_(count|sum))' || true
if [ -t 0 ]; then
  echo "the worker keeps serving; press Ctrl-C to stop it"
  wait $worker
fi
