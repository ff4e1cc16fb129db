#!/bin/sh
# Runs every target for SECS seconds (default 180) one after another, niced, and prints executions and coverage.
# Run from fuzz/ after ./seed.sh. Needs cargo-fuzz (`cargo install cargo-fuzz`); stable Rust works with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only -Z flags).
SECS=${1:-180}
shift
TARGETS=${*:-"npy config_json preprocessor_json safetensors msgpack pickle_data pickle_zip image"}
mkdir -p logs
for t in $TARGETS; do
  RUSTC_BOOTSTRAP=1 nice -n 10 cargo fuzz run -O "$t" corpus/$t -- -max_total_time=$SECS -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 -timeout=10 -print_final_stats=1 > logs/$t.log 2>&1
  rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' logs/$t.log | grep -o '[0-9]*$')
  last=$(grep -E '^#[0-9]+' logs/$t.log | tail -1)
  echo "$t rc=$rc runs=$runs last: $last"
done
