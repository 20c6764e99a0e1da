#!/usr/bin/env bash
# launch/local.sh N CMD... : a multi-host run as N processes on this machine (CPU devices).
#
# For development and tests of the multi-host path without a cluster: each process is one
# "host" with JAXEMBED_LOCAL_DEVICES CPU devices (default 4), and JAX's distributed runtime
# connects them through a coordinator on localhost (gloo collectives on CPU).
#
# Needs: bash >= 4.3, the project installed (scripts/setup.sh); CMD is any jaxembed tool.
#
# Example (2 hosts x 4 devices train like 1 host x 8 devices):
#   launch/local.sh 2 .venv/bin/python -m jaxembed.train \
#       --config configs/demo.py --workdir runs/demo-2hosts
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
# jaxembed.distributed). Output lines are prefixed with the process id, "[0] ...". If one
# process fails, the others are stopped at once and this script exits with its status;
# Ctrl-C / SIGTERM is passed to every process (training saves a checkpoint, then exits).
#
# Environment: JAXEMBED_LOCAL_DEVICES (CPU devices per process, default 4),
# JAX_COORDINATOR_PORT (default: a free port), JAXEMBED_HEARTBEAT_TIMEOUT (seconds, see
# jaxembed.distributed), JAXEMBED_KILL_GRACE (seconds between SIGTERM and SIGKILL when
# stopping the others, default 10), JAX_PLATFORMS (default cpu).
set -uo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  usage >&2
  exit 2
fi
n=$1
shift
devices=${JAXEMBED_LOCAL_DEVICES:-4}
if ! [[ $devices =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: JAXEMBED_LOCAL_DEVICES=$devices is not a positive integer" >&2
  exit 2
fi
port=${JAX_COORDINATOR_PORT:-}
if [ -z "$port" ]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || {
    echo "local.sh: could not find a free port (set JAX_COORDINATOR_PORT)" >&2
    exit 2
  }
fi

pids=()
for ((i = 0; i < n; i++)); do
  # The command is the process itself ($! is its pid); a process substitution prefixes lines.
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    PYTHONUNBUFFERED=1 \
    "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
forward() {
  echo "local.sh: $1: passing it to all $n processes" >&2
  stop_all "$1"
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
running=$n
killer=
declare -A done_=()
while [ "$running" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -n "${done_[$i]:-}" ] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    rc=$?
    done_[$i]=1
    running=$((running - 1))
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      if [ "$running" -gt 0 ]; then
        echo "local.sh: process $i exited with status $rc: stopping the other processes" >&2
        stop_all TERM
        # Processes stuck in a collective ignore SIGTERM's graceful path: kill after a grace.
        (sleep "${JAXEMBED_KILL_GRACE:-10}"; stop_all KILL) >/dev/null 2>&1 &
        killer=$!
      fi
    fi
  done
  sleep 0.2
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null
wait 2>/dev/null  # the line-prefixing subprocesses
exit "$status"
