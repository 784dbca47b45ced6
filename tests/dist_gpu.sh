#!/usr/bin/env bash
# Two NCCL ranks on the cuda backend, launched torchrun-style: fully_sharded
# (gathers, prefetch on the communication stream, reduce-scatter into shards,
# recomputation) and plain data parallel must log the same losses as one rank
# with the same global batch. On a machine with one GPU both ranks share it:
# NCCL refuses two ranks on one device of one host, so each rank gets its own
# NCCL_HOSTID and they talk over sockets, which changes nothing in the math.
# usage: dist_gpu.sh <moelm-train>
set -u
train=$1
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU ||
  { echo "SKIP: no CUDA device visible"; exit 77; }
ngpu=$(nvidia-smi -L | grep -c GPU)
args="--task dummy_lm --tokens-per-sample 64 --dict-size 496 --arch transformer_lm_gpt
  --share-decoder-input-output-embed --decoder-layers 4 --decoder-embed-dim 128 --decoder-ffn-embed-dim 256
  --decoder-attention-heads 4 --moe-expert-count 2 --moe-freq 2 --moe-second-expert-policy all
  --moe-normalize-expert-grad world_size --criterion moe_cross_entropy --moe-gate-loss-wt 0.01
  --moe-gate-loss-combine-method sum --optimizer adam --adam-betas (0.9,0.98) --lr 0.002 --warmup-updates 2
  --dropout 0 --attention-dropout 0 --batch-size 4 --disable-validation --log-format json --log-interval 1
  --max-update 8 --distributed-timeout 60 --no-save"
losses() { grep -o '"loss": "[0-9.]*"' "$1" | grep -o '[0-9.]*' | tr '\n' ' '; }
two_ranks() { # <out> <extra...>
  local out=$1 port=$((20000 + RANDOM % 20000)) pids=() r
  shift
  for r in 0 1; do
    dev=$(( r % ngpu ))
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$dev MASTER_ADDR=127.0.0.1 MASTER_PORT=$port NCCL_HOSTID=moelm-test-$r \
      "$train" $args "$@" >"$out.$r" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cp "$out.0" "$out"
  return $rc
}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail=0
"$train" $args --update-freq 2 >"$dir/one" 2>&1 || { echo "1 rank failed:"; cat "$dir/one"; exit 1; }
ref=$(losses "$dir/one")
for mode in "--ddp-backend pytorch_ddp" "--ddp-backend fully_sharded --checkpoint-activations"; do
  if ! two_ranks "$dir/two" $mode; then
    echo "2 ranks ($mode) failed:"; cat "$dir/two.0" "$dir/two.1"; exit 1
  fi
  got=$(losses "$dir/two")
  echo "1 rank:              $ref"
  echo "2 ranks $mode: $got"
  paste <(echo "$ref" | tr ' ' '\n') <(echo "$got" | tr ' ' '\n') | awk -v m="$mode" '
    NF == 2 { n++; d = $1 - $2; if (d < 0) d = -d; if (d > 0.0025) { print "update " n ": " $1 " vs " $2 " (" m ")"; bad = 1 } }
    END { if (n != 8) { print "expected 8 losses, found " n; bad = 1 } exit bad }' || fail=1
done
exit $fail
