#!/usr/bin/env bash
# Semantic segmentation on real images (README, "Semantic segmentation: does it work?"): canvases of handwritten
# digits from data/digits (scripts/make_digit_scenes.py; validation canvases use only held-out digits), a small
# UperNet BEiT (models/digit-scenes-config.json) trained from scratch and from a `beit pretrain` model of the same
# shape (pre-trained on the training canvases only), same seed, epochs and hyper-parameters; both scored by mIoU on
# the validation canvases with `beit eval`, and a picture of predictions beside the truth.
#
#   scripts/seg_digits.sh                        # BEIT=target/release/beit OUT=runs/seg-digits PY=python3
#   EPOCHS=40 PT_EPOCHS=10 SEED=0 scripts/seg_digits.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BEIT=${BEIT:-target/release/beit}
PY=${PY:-python3}
DATA=${DATA:-data/digit-scenes}
OUT=${OUT:-runs/seg-digits}
EPOCHS=${EPOCHS:-40}
PT_EPOCHS=${PT_EPOCHS:-10}
SEED=${SEED:-0}
CONFIG=models/digit-scenes-config.json
TOKENIZER=crates/beit/tests/fixtures/tokenizer/encoder.safetensors

[ -d "$DATA/images/training" ] || "$PY" scripts/make_digit_scenes.py "$DATA"
mkdir -p "$OUT"
if [ ! -f "$OUT/pretrain/last/config.json" ]; then
  "$BEIT" pretrain --data "$DATA/images/training" --tokenizer "$TOKENIZER" --config "$CONFIG" --out "$OUT/pretrain" \
    --epochs "$PT_EPOCHS" --batch-size 32 --lr 1.5e-3 --warmup-epochs 2 --crop-scale-min 0.6 --no-hflip --seed "$SEED"
fi
for start in scratch pretrained; do
  model=$CONFIG
  [ "$start" = pretrained ] && model=$OUT/pretrain/last
  "$BEIT" train --task semantic-segmentation --model "$model" --data "$DATA" --out "$OUT/$start" --image-size 32 \
    --epochs "$EPOCHS" --batch-size 16 --lr 2e-3 --warmup-epochs 2 --layer-decay 1.0 --seed "$SEED"
  "$BEIT" eval --task semantic-segmentation --model "$OUT/$start/best" --data "$DATA" --json "$OUT/$start/eval.json"
done
mkdir -p "$OUT/pred"
"$BEIT" segment --model "$OUT/pretrained/best" --out "$OUT/pred" \
  $(ls "$DATA/images/validation" | sort | head -8 | sed "s|^|$DATA/images/validation/|")
"$PY" scripts/seg_grid.py docs/seg-digits.png "$DATA" "$OUT/pred" 8
for start in scratch pretrained; do
  "$PY" -c "import json,sys; e=json.load(open(sys.argv[1])); print(sys.argv[2], {k: e[k] for k in e if k in ('mean_iou','mean_accuracy','overall_accuracy')})" \
    "$OUT/$start/eval.json" "$start"
done
