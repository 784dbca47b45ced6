#!/usr/bin/env bash
# The whole story on a small scale: builds moelm, prepares a small real corpus
# that every Debian or Ubuntu system ships (the license texts in
# /usr/share/common-licenses), trains a small MoE language model on it for a
# few minutes (on a GPU when one is visible, otherwise on the CPU), prints the
# test perplexity and continues a few prompts.
#
# Everything goes under $WORK (default build/example): data-bin/ (the
# binarized corpus), checkpoints/. Extra arguments go to moelm-train (e.g.
# --max-update 100).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
bin=build/bin
work=${WORK:-build/example}
mkdir -p "$work"

# ---- corpus: the UTF-8 license texts, binarized (fairseq-preprocess's dictionary and mmap datasets)
scripts/small-corpus.sh "$work" "$bin"

# ---- train: a GPU trains a larger model in about the same time
if "$bin/moelm-train" --list-plugins 2>/dev/null | grep -q "cuda" && command -v nvidia-smi >/dev/null 2>&1 \
   && nvidia-smi -L >/dev/null 2>&1; then
  model=(--decoder-layers 6 --decoder-embed-dim 512 --decoder-ffn-embed-dim 2048 --decoder-attention-heads 8
         --moe-expert-count 8 --tokens-per-sample 128 --batch-size 32 --max-update 1500 --warmup-updates 100
         --lr 0.001 --bf16)
else
  model=(--decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 256 --decoder-attention-heads 4
         --moe-expert-count 4 --tokens-per-sample 64 --batch-size 16 --max-update 400 --warmup-updates 40
         --lr 0.003 --cpu)
fi
rm -rf "$work/checkpoints"
"$bin/moelm-train" --task language_modeling "$work/data-bin" \
  --arch transformer_lm_gpt --share-decoder-input-output-embed --moe-freq 2 \
  --moe-gating-use-fp32 --moe-second-expert-policy all --moe-normalize-expert-grad sqrt_world_size \
  --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum \
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 --lr-scheduler inverse_sqrt \
  --dropout 0.1 --attention-dropout 0.1 --save-interval-updates 100 --keep-interval-updates 1 \
  --save-dir "$work/checkpoints" --no-epoch-checkpoints --log-format simple --log-interval 50 \
  "${model[@]}" "$@"

# ---- evaluate the best checkpoint on the test split, then continue a few prompts
ckpt="$work/checkpoints/checkpoint_best.pt"
"$bin/moelm-eval-lm" "$work/data-bin" --path "$ckpt" --gen-subset test
printf '%s\n' "This License applies to" "You may convey" "the Free Software Foundation" |
  "$bin/moelm-generate" "$work/data-bin" --path "$ckpt" --sampling --sampling-topk 10 --temperature 0.8 \
    --seed 1 --max-len-b 30 --output-format plain
