#!/usr/bin/env bash
# Resident memory of `taskstream run` around a snapshot of a large graph (issue 10's figures):
# RSS one second after start, RSS once the snapshot is delivered, and the peak (VmHWM).
# Uses the release binary; the simulator runs as its own process, so its memory is not counted.
#   bash benches/memory.sh [NODES] [LINKS]     (default 60000 60000, about 118,000 objects)
# STATE_CACHE_MB sets state.cache_mb (default: the connector's, 64). The environment is passed
# on, so `MIMALLOC_ARENA_EAGER_COMMIT=0 bash benches/memory.sh` measures the container's setting.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-60000}
links=${2:-60000}
cargo build --release --quiet --bin taskstream
bin=target/release/taskstream
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port); jobs_port=$(free_port); metrics_port=$(free_port)
token=st_memory_bench_0123456789
uid=3c2b1a09-8f7e-4d6c-9b5a-4f3e2d1c0b9a
"$bin" sim --port "$sim_port" --jobs-port "$jobs_port" --tokens "$token:$uid" --nodes "$nodes" \
  --links "$links" --rate 0 --read-window-ms 1000 > "$dir/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do grep -q '"ready"' "$dir/sim.log" && break; sleep 0.2; done
cat > "$dir/taskstream.toml" <<TOML
[source]
url = "http://127.0.0.1:$sim_port"
read_window_ms = 1000
[state]
path = "$dir/state.redb"
${STATE_CACHE_MB:+cache_mb = $STATE_CACHE_MB}
[sinks.stdout]
enabled = true
path = "/dev/null"
fsync = "never"
[metrics]
listen = "127.0.0.1:$metrics_port"
TOML
SYNAPTASK_API_TOKEN=$token TASKSTREAM_LOG_FORMAT=text "$bin" run --config "$dir/taskstream.toml" > "$dir/run.log" 2>&1 &
pid=$!
pids+=("$pid")
rss() { awk -v k="$1:" '$1==k {print int($2/1024)}' "/proc/$pid/status"; }
sleep 1
at_start=$(rss VmRSS)
started=$(date +%s)
until curl -s "127.0.0.1:$metrics_port/metrics" | grep -q '^taskstream_snapshots_total [1-9]'; do
  sleep 0.5
  if [ $(( $(date +%s) - started )) -gt 900 ]; then echo "no snapshot within 15 minutes" >&2; exit 1; fi
done
secs=$(( $(date +%s) - started ))
sleep 3
after=$(rss VmRSS)
peak=$(rss VmHWM)
objects=$(( nodes + links ))
echo "| graph | RSS 1 s after start | RSS after the snapshot | peak RSS | per object (peak) | snapshot |"
echo "|---|---|---|---|---|---|"
echo "| $nodes nodes + $links links | $at_start MB | $after MB | $peak MB | $(( peak * 1024 * 1024 / objects )) B | ${secs} s |"
