#!/usr/bin/env bash
# BEiT pre-training proof on the digits (README, "Pre-training"): masked image modeling on the training images
# with the fixture DALL-E encoder, then fine-tuning on 10% of the training labels, pre-trained vs from scratch,
# same seeds, epochs and hyper-parameters, scored on the same held-out images (never seen by either stage).
#
#   scripts/pretrain_digits.sh                 # BEIT=target/release/beit OUT=runs/pretrain-digits
#   PT_EPOCHS=60 FT_EPOCHS=100 SEEDS="0 1 2 3 4" scripts/pretrain_digits.sh   # the defaults: 22 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
BEIT=${BEIT:-target/release/beit}
OUT=${OUT:-runs/pretrain-digits}
TOKENIZER=${TOKENIZER:-crates/beit/tests/fixtures/tokenizer/encoder.safetensors}
PT_EPOCHS=${PT_EPOCHS:-60}
FT_EPOCHS=${FT_EPOCHS:-100}
SEEDS=${SEEDS:-"0 1 2 3 4"}

# The split, per class in file-name order: every 5th image is validation (20%), the others training; every 10th
# training image keeps its label for fine-tuning (10%). data/ and lowlabel/ use beit train's DIR/train + DIR/val
# layout, so fine-tuning validates on exactly DIR/val, and beit pretrain (which reads only DIR/train when it
# exists) never sees those images.
if [ -e "$OUT" ] && [ ! -d "$OUT/data/train" ]; then
  echo "$OUT exists and is not an earlier run of this script; set OUT to a new folder" >&2; exit 1
fi
rm -rf "$OUT"
for c in $(ls data/digits); do
  [ -d "data/digits/$c" ] || continue
  mkdir -p "$OUT/data/train/$c" "$OUT/data/val/$c" "$OUT/lowlabel/train/$c" "$OUT/lowlabel/val/$c"
  i=0; t=0
  for f in $(ls "data/digits/$c"); do
    if [ $((i % 5)) -eq 0 ]; then
      cp "data/digits/$c/$f" "$OUT/data/val/$c/"; cp "data/digits/$c/$f" "$OUT/lowlabel/val/$c/"
    else
      cp "data/digits/$c/$f" "$OUT/data/train/$c/"
      if [ $((t % 10)) -eq 0 ]; then cp "data/digits/$c/$f" "$OUT/lowlabel/train/$c/"; fi
      t=$((t + 1))
    fi
    i=$((i + 1))
  done
done
echo "split: $(find "$OUT/data/train" -type f | wc -l) training images (unlabelled for pre-training)," \
  "$(find "$OUT/lowlabel/train" -type f | wc -l) labelled, $(find "$OUT/data/val" -type f | wc -l) validation"

start=$(date +%s)
"$BEIT" pretrain --data "$OUT/data" --tokenizer "$TOKENIZER" --config models/digits-config.json --out "$OUT/pretrain" \
  --epochs "$PT_EPOCHS" --batch-size 32 --lr 1.5e-3 --warmup-epochs 5 --crop-scale-min 0.6 --no-hflip --seed 0 \
  2> >(tee "$OUT/pretrain.log" >&2)
echo "pre-training: $(( $(date +%s) - start )) s"

for seed in $SEEDS; do
  for init in pretrained scratch; do
    model=$([ $init = pretrained ] && echo "$OUT/pretrain" || echo models/digits-config.json)
    start=$(date +%s)
    "$BEIT" train --model "$model" --data "$OUT/lowlabel" --out "$OUT/ft-$init-$seed" --epochs "$FT_EPOCHS" \
      --batch-size 16 --lr 2e-3 --layer-decay 1.0 --warmup-epochs 3 --crop-scale-min 0.6 --no-hflip --seed "$seed" \
      2> "$OUT/ft-$init-$seed.log"
    echo "fine-tuning $init, seed $seed: $(( $(date +%s) - start )) s; $(tail -n 1 "$OUT/ft-$init-$seed.log")"
  done
done

python3 - "$OUT" $SEEDS <<'PY'
import json, sys
out, seeds = sys.argv[1], sys.argv[2:]
def rows(path):
    return [json.loads(l) for l in open(path) if l.strip()]
pt = rows(f"{out}/pretrain/metrics.jsonl")
print("pre-training: epoch, loss, masked-token accuracy, most common token's share (1/vocab = 1.56%)")
for m in pt:
    print(f"  {m['epoch']:3d}  {m['loss']:.4f}  {100*m['masked_accuracy']:6.2f}%  {100*m['majority_token_share']:6.2f}%")
print("fine-tuning on 10% of the labels: validation top-1 at the last epoch (best epoch)")
res = {}
for init in ("pretrained", "scratch"):
    for s in seeds:
        h = rows(f"{out}/ft-{init}-{s}/metrics.jsonl")
        res.setdefault(init, []).append((h[-1]["top1"], max(x["top1"] for x in h)))
for init, v in res.items():
    last = " ".join(f"{100*a:.2f}% ({100*b:.2f}%)" for a, b in v)
    mean = sum(a for a, _ in v) / len(v)
    print(f"  {init:10s} seeds {' '.join(seeds)}: {last}; mean last {100*mean:.2f}%")
PY
