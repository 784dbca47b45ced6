#!/usr/bin/env bash
# A rank that stalls does not leave the others hanging: rank 1 of 2 is stopped
# (SIGSTOP) once training runs; rank 0 must fail within --distributed-timeout
# with a message naming the collective that timed out.
# usage: dist_stall.sh <moelm-train>
set -u
train=$1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
command -v mpirun >/dev/null 2>&1 || { echo "SKIP: mpirun not found"; exit 77; }
out=$(mktemp)
mpirun --oversubscribe -np 2 "$train" --cpu --task dummy_lm --tokens-per-sample 32 --dict-size 96 \
  --arch transformer_lm_gpt --decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 \
  --decoder-attention-heads 2 --moe-expert-count 2 --moe-freq 2 --criterion moe_cross_entropy \
  --optimizer adam --lr 0.001 --batch-size 2 --max-update 100000 --disable-validation \
  --log-format json --log-interval 1 --distributed-timeout 5 >"$out" 2>&1 &
launcher=$!
# wait until rank 0 has logged an update, then stop rank 1
for _ in $(seq 1 200); do
  grep -q '"num_updates"' "$out" && break
  sleep 0.1
done
pids=$(pgrep -f -- "--distributed-timeout 5" | grep -v "^$launcher$")
victim=""
for p in $pids; do
  if tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -q '^OMPI_COMM_WORLD_RANK=1$'; then victim=$p; fi
done
[ -n "$victim" ] || { echo "could not find rank 1"; kill $launcher; cat "$out"; exit 1; }
kill -STOP "$victim"
start=$(date +%s)
# rank 0 must give up on its own; mpirun then ends the job
for _ in $(seq 1 300); do
  grep -q "timed out" "$out" && break
  sleep 0.1
done
elapsed=$(( $(date +%s) - start ))
kill -CONT "$victim" 2>/dev/null
kill -9 "$victim" 2>/dev/null
wait $launcher 2>/dev/null
if grep -q "moelm-train: error: MPI .* timed out after 5 s on rank 0: rank 1 died or stalled" "$out" && [ "$elapsed" -le 25 ]; then
  echo "rank 0 failed after ${elapsed}s: $(grep -o 'moelm-train: error: .*' "$out" | head -1)"
  rm -f "$out"
  exit 0
fi
echo "expected rank 0 to time out within 25 s (elapsed ${elapsed}s); output:"
cat "$out"
rm -f "$out"
exit 1
