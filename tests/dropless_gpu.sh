#!/usr/bin/env bash
# --moe-dropless on the cuda backend, where the experts multiply only the
# rows routing filled (expert_rows + grouped_matmul, the counts never leave
# the GPU), against the cpu, which multiplies the same rows counted on the
# host: the per-update losses agree, in fp32 (the grouped product's plain
# kernel) tightly and in bf16 (its tensor-core kernel) to bf16's rounding.
# usage: dropless_gpu.sh <moelm-train>
set -u
train=$1
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU ||
  { echo "SKIP: no CUDA device visible"; exit 77; }
args="--task dummy_lm --tokens-per-sample 64 --dict-size 496 --arch transformer_lm_gpt
  --share-decoder-input-output-embed --decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 128
  --decoder-attention-heads 4 --moe-expert-count 8 --moe-freq 2 --moe-second-expert-policy all
  --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --optimizer adam --lr 0.003 --clip-norm 0.0
  --batch-size 4 --disable-validation --log-format json --log-interval 1 --max-update 8 --no-save --moe-dropless"
losses() { grep '| train_inner |' "$1" | grep -o '"loss": "[0-9.]*"' | grep -o '[0-9.]*' | tr '\n' ' '; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail=0
for prec in fp32 bf16; do
  flag=""; tol=0.002
  [ "$prec" = bf16 ] && { flag="--bf16"; tol=0.08; }
  "$train" $args $flag --cpu >"$dir/cpu" 2>&1 || { echo "cpu $prec failed:"; cat "$dir/cpu"; exit 1; }
  "$train" $args $flag >"$dir/gpu" 2>&1 || { echo "cuda $prec failed:"; cat "$dir/gpu"; exit 1; }
  grep -q '"overflow_expert1": "0"' "$dir/gpu" || { echo "cuda $prec dropped tokens"; fail=1; }
  c=$(losses "$dir/cpu") g=$(losses "$dir/gpu")
  echo "$prec cpu:  $c"
  echo "$prec cuda: $g"
  python3 - "$c" "$g" "$tol" <<'PY' || fail=1
import sys
c, g, tol = [float(x) for x in sys.argv[1].split()], [float(x) for x in sys.argv[2].split()], float(sys.argv[3])
assert len(c) == 8 and len(g) == 8, (c, g)
worst = max(abs(a - b) for a, b in zip(c, g))
print(f"max |loss difference| {worst:.4f} (tolerance {tol})")
sys.exit(0 if worst <= tol else 1)
PY
done
exit $fail
