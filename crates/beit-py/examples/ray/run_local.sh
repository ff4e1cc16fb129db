#!/usr/bin/env bash
# The Ray Data example on a local two-node Ray cluster (two `ray start` on this machine, each with its own CPU
# share), checked row by row against the beit CLI:
#   1. one node, one actor:            throughput, rows == `beit classify`
#   2. two nodes, one actor per node:  throughput, rows == `beit classify`
#   3. two nodes, embeddings, one actor SIGKILLed mid-run: nothing lost or duplicated, rows == `beit embed`
#
# Needs: a Python with ray[data] and beit_rs installed (PYTHON, default: python3), the beit binary (BEIT, default:
# target/release/beit, else target/debug/beit). Usage, from the repository root:
#   PYTHON=venv-ray/bin/python crates/beit-py/examples/ray/run_local.sh
set -euo pipefail
cd "$(dirname "$0")/../../../.."
PYTHON=${PYTHON:-python3}
BEIT=${BEIT:-$( [ -x target/release/beit ] && echo target/release/beit || echo target/debug/beit )}
MODEL=${MODEL:-models/beit-digits}
INPUT=${INPUT:-data/digits}
# Each node is given one CPU: its actor reserves 0.75 of it (so that two actors cannot share a node) and runs one
# thread, reads and writes take the rest.
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
HERE=crates/beit-py/examples/ray
WORK=$(mktemp -d /tmp/beit-ray.XXXXXX)
RAY="$(dirname "$PYTHON")/ray"
PORT=${RAY_PORT:-6390}
export RAY_USAGE_STATS_ENABLED=0

stop() { "$RAY" stop --force >/dev/null 2>&1 || true; }
trap stop EXIT
stop

job() {  # job NAME ARGS...: runs beit_ray.py against the cluster, prints its JSON line
  local name=$1; shift
  "$PYTHON" "$HERE/beit_ray.py" --address "127.0.0.1:$PORT" --model "$MODEL" --input "$INPUT" \
    --output "$WORK/$name" --num-cpus 0.75 --threads 1 --io-cpus 0.25 "$@" 2>"$WORK/$name.log" | tail -1
}

verify() {  # verify NAME TASK
  "$PYTHON" "$HERE/verify.py" --beit "$BEIT" --model "$MODEL" --input "$INPUT" --output "$WORK/$1" --task "$2"
}

echo "== head node ($CPUS_PER_NODE CPU)"
# Both nodes run on this machine; Ray registers them under the machine's own interface address (Ray 2.60 does not
# keep --node-ip-address 127.0.0.1), so the cluster's traffic stays on this host.
"$RAY" start --head --port "$PORT" --num-cpus "$CPUS_PER_NODE" --include-dashboard=false --disable-usage-stats >/dev/null
echo "one node, 1 actor:  $(job one --concurrency 1)"
verify one classify

echo "== second node ($CPUS_PER_NODE CPU)"
"$RAY" start --address "127.0.0.1:$PORT" --num-cpus "$CPUS_PER_NODE" >/dev/null
"$PYTHON" - "$PORT" <<'PY'
import sys, time, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", log_to_driver=False)
for _ in range(60):
    if sum(n["Alive"] for n in ray.nodes()) == 2:
        break
    time.sleep(1)
print("nodes alive:", sum(n["Alive"] for n in ray.nodes()))
PY
echo "two nodes, 2 actors: $(job two --concurrency 2)"
verify two classify

echo "== two nodes, embeddings, one actor killed mid-run"
PIDS="$WORK/pids"
mkdir -p "$PIDS"
job killed --task embed --concurrency 2 --batch-size 32 --pid-dir "$PIDS" > "$WORK/killed.json" &
JOB=$!
# Once the actors have finished a few batches, SIGKILL the first one's process.
victim=""
for _ in $(seq 600); do
  if [ "$(ls "$PIDS" | grep -c '^batch-')" -ge 4 ]; then
    victim=$(ls "$PIDS" | grep '^actor-' | head -1 | cut -d- -f2)
    kill -9 "$victim" && echo "killed actor pid $victim after $(ls "$PIDS" | grep -c '^batch-') batches"
    break
  fi
  sleep 0.1
done
wait "$JOB"
echo "embed with a killed actor: $(cat "$WORK/killed.json")"
echo "actors started: $(ls "$PIDS" | grep -c '^actor-') (2 + the restart)"
[ -n "$victim" ] || { echo "FAIL: no actor was killed"; exit 1; }
verify killed embed
echo "all checks passed (outputs in $WORK)"
