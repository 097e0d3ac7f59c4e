#!/usr/bin/env bash
# The demo: set up, run a worker on the CPU backend, enqueue the sample photos, print a summary of
# the results and the metrics URL. Uses IMGWORKER_REDIS__URL when it is set (it must answer);
# otherwise starts a private redis-server on a free port and stops it again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT

if [ -n "${IMGWORKER_REDIS__URL:-}" ]; then
  redis_url=$IMGWORKER_REDIS__URL
  redis-cli -u "$redis_url" ping >/dev/null 2>&1 || { echo "demo: no Redis answers at IMGWORKER_REDIS__URL" >&2; exit 1; }
else
  redis_port=$(free_port)
  redis_dir=$(mktemp -d)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" \
    --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log"
  cleanup+=("redis-cli -p $redis_port shutdown nosave >/dev/null 2>&1 || true; rm -rf $redis_dir")
  redis_url=redis://127.0.0.1:$redis_port/0
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "demo: started a private redis-server at $redis_url"
fi
port=${IMGWORKER_METRICS__PORT:-$(free_port)}

.venv/bin/python -m worker run --redis-url "$redis_url" --metrics-port "$port" &
worker=$!
cleanup=("kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true" "${cleanup[@]}")
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 $worker 2>/dev/null || { echo "demo: the worker exited" >&2; exit 1; }
  sleep 0.2
done

photos=$(.venv/bin/python -c 'from worker.core.settings import Settings; print(Settings().assets_dir / "demo")')
echo
echo "The model is PP-OCRv4's text detector: for each photo it finds where text is (a box around each"
echo "word or line of text, in the photo's pixels) but does not read it. $(ls "$photos" | wc -l) photos with text:"
.venv/bin/python -m worker enqueue --redis-url "$redis_url" --wait --timeout 600 "$photos"

echo
echo "metrics: http://127.0.0.1:$port/metrics   health: /healthz   readiness: /readyz"
curl -fs "http://127.0.0.1:$port/metrics" | grep -E '^imgworker_(jobs_completed_total|batch_size_(count|sum)|inference_seconds_(count|sum))' || true
if [ -t 0 ]; then
  echo "the worker keeps serving; press Ctrl-C to stop it"
  wait $worker || true
fi
