#!/usr/bin/env bash
# Capacity by the quota method: the server capped with a cgroup v1 CPU quota (so the load
# generator is never the limit), one publisher at 1.5 Mbit/s, N browser-like subscribers.
#
#   ../shared/bin/netns bench/quota.sh MEDIA_THREADS QUOTA_PERCENT SERVER_CPUS SUBSCRIBERS [bench args]
#   e.g. bench/quota.sh 1 25 0 150      bench/quota.sh 2 50 0-1 300
#
# Needs root (cgroup v1 `cpu` controller at /sys/fs/cgroup/cpu) and release builds of
# switchboard and switchboard-bench. Prints the loss, latency and server CPU lines of the report.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=$1 percent=$2 cpus=$3 subscribers=$4
shift 4
group=/sys/fs/cgroup/cpu/switchboard-quota-$$
mkdir -p "$group"
echo 10000 > "$group/cpu.cfs_period_us"
echo $((percent * 100)) > "$group/cpu.cfs_quota_us"
# Every generated client comes from one address: the limits meant for strangers go.
export SWITCHBOARD_MAX_CONNECTIONS=1000000 SWITCHBOARD_MAX_CONNECTIONS_PER_ADDRESS=1000000 \
  SWITCHBOARD_MAX_JOINS_PER_SECOND_PER_ADDRESS=1000000 SWITCHBOARD_MAX_JOINS_PER_SECOND_PER_ROOM=1000000 \
  SWITCHBOARD_MAX_SOCKETS_PER_TOKEN=1000000
SWITCHBOARD_MEDIA_THREADS=$threads taskset -c "$cpus" "${SERVER_BIN:-target/release/switchboard}" \
  --mesh-max 0 --max-participants 100000 --log-level warn --bind 127.0.0.1:8080 > target/quota-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rmdir "$group"' EXIT
echo $server > "$group/cgroup.procs"
sleep 1
taskset -c 1 target/release/switchboard-bench --url http://127.0.0.1:8080 --server-pid $server \
  --publishers 1 --subscribers "$subscribers" --duration 10 --quiet --out target/quota-bench "$@" > target/quota-bench.log 2>&1
echo "media threads $threads, quota $percent %, CPUs $cpus, $subscribers subscribers: $(grep -E '^\| loss|latency p50|server CPU \(' target/quota-bench.log | tr '\n' ' ')"
