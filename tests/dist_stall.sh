#!/usr/bin/env bash
# A rank that stalls does not leave the others hanging: rank <victim> of <np>
# is stopped (SIGSTOP) once training runs. Within --distributed-timeout plus
# the watchdog's grace, rank 0 must fail with a message that names the
# stalled rank, and the job must end by itself (no rank may hang in
# MPI_Finalize). mpirun kills the other ranks once one exits with an error, so
# only rank 0's line is required; every error line that did get out must name
# the victim, and the script says which ranks printed one.
# usage: dist_stall.sh <moelm-train> [np (2)] [victim rank (1)]
set -u
train=$1
np=${2:-2}
vr=${3:-1}
limit=25 # seconds from the SIGSTOP; expected: 5 s timeout + 5 s grace
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
command -v mpirun >/dev/null 2>&1 || { echo "SKIP: mpirun not found"; exit 77; }
# the ranks inherit this: it tells them from those of a stall test running beside
export MOE_STALL_TEST_TAG=$$
out=$(mktemp)
mpirun --oversubscribe -np "$np" "$train" --cpu --task dummy_lm --tokens-per-sample 32 --dict-size 96 \
  --arch transformer_lm_gpt --decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 \
  --decoder-attention-heads 2 --moe-expert-count "$np" --moe-freq 2 --criterion moe_cross_entropy \
  --optimizer adam --lr 0.001 --batch-size 2 --max-update 100000 --disable-validation \
  --log-format json --log-interval 1 --distributed-timeout 5 --no-save >"$out" 2>&1 &
launcher=$!
# wait until rank 0 has logged an update, then stop the victim
for _ in $(seq 1 300); do
  grep -q '"num_updates"' "$out" && break
  sleep 0.1
done
victim=""
for p in $(pgrep -f -- "moelm-train"); do
  env=$(tr '\0' '\n' < /proc/$p/environ 2>/dev/null)
  if grep -qx "MOE_STALL_TEST_TAG=$$" <<<"$env" && grep -qx "OMPI_COMM_WORLD_RANK=$vr" <<<"$env"; then
    victim=$p
  fi
done
[ -n "$victim" ] || { echo "could not find rank $vr"; kill $launcher; cat "$out"; rm -f "$out"; exit 1; }
kill -STOP "$victim"
start=$(date +%s)
# the job must end on its own: the failing ranks exit, then mpirun ends it
ended=0
for _ in $(seq 1 $((10 * (limit + 15)))); do
  kill -0 "$launcher" 2>/dev/null || { ended=1; break; }
  sleep 0.1
done
elapsed=$(( $(date +%s) - start ))
kill -CONT "$victim" 2>/dev/null
kill -9 "$victim" 2>/dev/null
[ "$ended" = 1 ] || kill "$launcher" 2>/dev/null
wait "$launcher" 2>/dev/null
lines=$(grep -o 'moelm-train: error: .*' "$out")
stalled=": rank $vr stalled (no answer to the watchdog)"
# what rank r was doing: its own timeout, the collective it waited in, or nothing
doing() { echo "(MPI [a-z_]+ timed out after 5 s on rank $1|MPI [a-z_]+ on rank $1 \(waiting [0-9]+ s\)|rank $1 cannot continue)"; }
printed=""
for r in $(seq 0 $((np - 1))); do
  [ "$r" = "$vr" ] && continue
  grep -qE "^moelm-train: error: $(doing "$r"): rank $vr stalled \(no answer to the watchdog\)$" <<<"$lines" &&
    printed="$printed $r"
done
wrong=$(grep -vF -- "$stalled" <<<"$lines")
if [ "$ended" = 1 ] && [ "$elapsed" -le "$limit" ] && [[ " $printed " == *" 0 "* ]] && [ -z "$wrong" ]; then
  echo "rank $vr of $np stopped; the job ended after ${elapsed}s; ranks that named it:$printed"
  echo "$lines"
  rm -f "$out"
  exit 0
fi
echo "expected rank 0 to name rank $vr as stalled and the job to end within $limit s" \
  "(ended: $ended, after ${elapsed}s; ranks that named it:${printed:- none}); output:"
cat "$out"
rm -f "$out"
exit 1
