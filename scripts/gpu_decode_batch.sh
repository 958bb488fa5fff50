#!/usr/bin/env bash
# The issue-34 decode measurements in order of what they settle, for one device call each (600 s limit):
#
#   bash scripts/gpu_decode_batch.sh tune        # launch sweep of the sparse decode and the set top-k (~300 s)
#   bash scripts/gpu_decode_batch.sh gen128k     # 32-layer generate at 128K: dense policy vs shipped fasa (~250 s)
#   bash scripts/gpu_decode_batch.sh combo       # gen128k plus fasa on 64-token pages (~400 s), then `pieces` at
#                                                # 128K while the call has time left (COMBO_S, COMBO_VARIANTS)
#   bash scripts/gpu_decode_batch.sh gen32k      # 32K, the two variants in one order, then the other (~350 s)
#   bash scripts/gpu_decode_batch.sh profile     # one 4-layer 128K decode step by kernel and op (~200 s)
#   bash scripts/gpu_decode_batch.sh prism       # `bench --what methods --methods prism` at 8K and 32K (~200 s)
#   bash scripts/gpu_decode_batch.sh pieces      # one FASA layer's kernels, L2 warm and cold, 128K and 32K (~120 s)
#
# Results go to $OUT (the device tool's folder that comes back) or ./bench_out. Nothing here is needed on a CPU.
set -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true  # the backend's entry point
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  git rev-parse --short HEAD 2>/dev/null
  date -u
} | tee "$out/machine.txt"
# the SM / memory clocks and power every 250 ms while the measurement runs (latency-bound kernels follow the SM clock)
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 250 \
  > "$out/clocks.csv" 2>/dev/null &
clocks=$!
trap 'kill $clocks 2>/dev/null' EXIT
generate() {  # prompt, file stem, variants, seconds
  timeout "${4:-560}" python -m sparse_compile bench --what generate --layers 32 --prompt "$1" --new-tokens 128 --reps 1 \
    --variants "$3" --cache static --out "$out/$2.json" 2>&1 | tee "$out/$2.log"
}
case "${1:-}" in
  tune) timeout 560 python scripts/tune_decode_launch.py --lengths 131072,32768 --out "$out/tune_decode_launch.json" \
          2>&1 | tee "$out/tune.log" ;;
  gen128k) generate 131072 generate_128k "sparse_ro,sparse_ro:fasa@sparse32-pages" ;;
  combo) generate 131072 generate_128k_p64 \
           "${COMBO_VARIANTS:-sparse_ro,sparse_ro:fasa@sparse32-pages,sparse_ro:fasa@sparse64-pages}" "${COMBO_S:-480}"
         if [ "$SECONDS" -lt $((${COMBO_S:-480} - 60)) ]; then
           timeout $((${COMBO_S:-480} + 100 - SECONDS)) python scripts/time_decode_pieces.py --prompt 131072 \
             --out "$out/decode_pieces_131072.json" 2>&1 | tee "$out/decode_pieces_131072.log"
         fi ;;
  gen32k) generate 32768 generate_32k_a "sparse_ro,sparse_ro:fasa@sparse32-pages" 275  # each order once: a
          generate 32768 generate_32k_b "sparse_ro:fasa@sparse32-pages,sparse_ro" 275 ;;  # variant list runs once each
  profile) timeout 560 python scripts/profile_generate_step.py --prompt 131072 --layers 4 --new-tokens 16 --reps 1 \
             --runs fasa@sparse32-pages,dense@static --ops --out "$out/profile_generate_step.txt" 2>&1 | tail -5 ;;
  prism) timeout 560 python -m sparse_compile bench --what methods --methods prism --prefill-lengths 8K,32K \
           --out "$out/bench_prism.json" 2>&1 | tee "$out/bench_prism.log" ;;
  pieces) for n in 131072 32768; do
            timeout 270 python scripts/time_decode_pieces.py --prompt $n --out "$out/decode_pieces_$n.json" 2>&1 \
              | tee "$out/decode_pieces_$n.log"
          done ;;
  *) echo "usage: $0 tune|gen128k|combo|gen32k|profile|prism|pieces" >&2; exit 2 ;;
esac
