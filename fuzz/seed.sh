#!/bin/sh
# Builds the seed corpora under fuzz/corpus/<target>/ from the real test fixtures. Run from fuzz/.
set -e
F=../crates/beit/tests/fixtures
mkdir -p corpus/safetensors corpus/pickle_zip corpus/pickle_data corpus/msgpack corpus/config_json \
         corpus/preprocessor_json corpus/npy corpus/image
n=0
for f in $F/model/*/model.safetensors $F/model/*/inputs.safetensors $F/ops.safetensors; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 200000 ] && cp "$f" corpus/safetensors/$n.st && n=$((n+1))
done
n=0
for f in $F/pickle/*.bin $F/model/*/pytorch_model.bin; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 200000 ] && cp "$f" corpus/pickle_zip/$n.bin && n=$((n+1))
done
# pickle_data: the data.pkl entries of the pickle fixtures.
n=0
for f in $F/pickle/*.bin; do
  if unzip -l "$f" >/dev/null 2>&1; then
    unzip -p "$f" '*/data.pkl' > corpus/pickle_data/$n.pkl 2>/dev/null || true
    n=$((n+1))
  fi
done
n=0
for f in $F/flax/*/flax_model.msgpack; do cp "$f" corpus/msgpack/$n.msgpack; n=$((n+1)); done
n=0
for f in $F/model/*/config.json $F/flax/*/config.json $F/family/*/config.json; do
  [ -f "$f" ] && cp "$f" corpus/config_json/$n.json && n=$((n+1))
done
n=0
for f in $F/processor/configs/*.json $F/model/*/preprocessor_config.json; do
  [ -f "$f" ] && cp "$f" corpus/preprocessor_json/$n.json && n=$((n+1))
done
n=0
for f in $F/model/*/*.npy; do cp "$f" corpus/npy/$n.npy; n=$((n+1)); done
n=0
for f in $F/processor/images/* $F/processor/jpeg/*; do
  [ "$(stat -c %s "$f")" -lt 20000 ] && cp "$f" corpus/image/$n.img && n=$((n+1))
done
for d in corpus/*; do echo "$d: $(ls $d | wc -l) seeds"; done
