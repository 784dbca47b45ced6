#!/usr/bin/env bash
# --moe-dropless on the cuda backend, where the experts multiply only the
# rows routing filled (expert_rows + grouped_matmul, the counts never leave
# the GPU), against the cpu, which multiplies the same rows counted on the
# host: the per-update losses agree, in fp32 (the grouped product's plain
# kernel) tightly and in bf16 (its tensor-core kernel) to bf16's rounding.
# Then expert parallel in fp32: 2 NCCL ranks of 4 experts each (the counts
# exchanged by an all-to-all on the GPU) against one rank with the same
# global batch, to the logged precision (no dropout: its draws follow the
# micro-batch a rank runs, which differs between the two). On one GPU both ranks share it (own NCCL_HOSTID each, as in
# dist_gpu.sh).
# usage: dropless_gpu.sh <moelm-train>
set -u
train=$1
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU ||
  { echo "SKIP: no CUDA device visible"; exit 77; }
args="--task dummy_lm --tokens-per-sample 64 --dict-size 496 --arch transformer_lm_gpt
  --share-decoder-input-output-embed --decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 128
  --decoder-attention-heads 4 --moe-expert-count 8 --moe-freq 2 --moe-second-expert-policy all
  --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 --optimizer adam --lr 0.003 --clip-norm 0.0
  --batch-size 4 --disable-validation --log-format json --log-interval 1 --max-update 8 --no-save --moe-dropless
  --dropout 0 --attention-dropout 0"
losses() { grep '| train_inner |' "$1" | grep -o '"loss": "[0-9.]*"' | grep -o '[0-9.]*' | tr '\n' ' '; }
compare() { # <losses a> <losses b> <tolerance>
  python3 - "$1" "$2" "$3" <<'PY'
import sys
c, g, tol = [float(x) for x in sys.argv[1].split()], [float(x) for x in sys.argv[2].split()], float(sys.argv[3])
assert len(c) == 8 and len(g) == 8, (c, g)
worst = max(abs(a - b) for a, b in zip(c, g))
print(f"max |loss difference| {worst:.4f} (tolerance {tol})")
sys.exit(0 if worst <= tol else 1)
PY
}
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
  compare "$c" "$g" "$tol" || fail=1
done

ngpu=$(nvidia-smi -L | grep -c GPU)
"$train" $args --update-freq 2 --moe-normalize-expert-grad world_size >"$dir/one" 2>&1 ||
  { echo "1 rank failed:"; cat "$dir/one"; exit 1; }
port=$((20000 + RANDOM % 20000)) pids=()
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=$((r % ngpu)) MASTER_ADDR=127.0.0.1 MASTER_PORT=$port NCCL_HOSTID=moelm-dl-$r \
    "$train" $args --moe-normalize-expert-grad world_size --distributed-timeout 60 >"$dir/two.$r" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
[ $rc = 0 ] || { echo "2 ranks failed:"; cat "$dir/two.0" "$dir/two.1"; exit 1; }
a=$(losses "$dir/one") b=$(losses "$dir/two.0")
echo "fp32 1 rank:  $a"
echo "fp32 2 ranks: $b"
compare "$a" "$b" 0.0025 || fail=1
exit $fail
