#!/usr/bin/env bash
# Tensor parallelism on GPUs (for a session with a GPU machine; <= 8 minutes):
# builds a tiny llama (plain F32 and GGUF Q8_0, tests/ builders), then compares greedy text of
#   mistralrs --tp 2 --device cuda (NCCL, one GPU per rank)   [needs 2 GPUs]
# with the single-process CPU run, and runs the sharded-logits check of tests/test_tp.py over NCCL.
# Usage: scripts/gpu_check_tp.sh [PYTHON]   (run from the repository root)
set -u
PY=${1:-.venv/bin/python}
MRS="$(dirname "$PY")/mistralrs"
OUT=${OUT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 PYTHONPATH=tests:${PYTHONPATH:-}
deadline=$((SECONDS + 470))
left() { echo $((deadline - SECONDS)); }

ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
echo "GPUs: $ngpu"; nvidia-smi -L 2>/dev/null
timeout "$(left)" "$PY" - "$OUT" <<'PY' || { echo "FAIL: building the tiny models"; exit 1; }
import sys
from pathlib import Path
from gguf import GGMLQuantizationType as Q
import gguf_builder as gb
from test_tp import write_plain
out = Path(sys.argv[1]); hf = gb.tiny_llama(0)
write_plain(out / "llama", hf)
gb.write_gguf(out / "llama-q8_0.gguf", hf, gb.gguf_vocab(gb.train_tokenizer()), qtype=Q.Q8_0)
PY
args=(--raw --prompt "the quick brown fox" --temperature 0 --max-tokens 16 --ignore-eos)
cpu=$(timeout "$(left)" "$MRS" --device cpu "${args[@]}" gguf -f "$OUT/llama-q8_0.gguf" 2>"$OUT/cpu.err")
echo "cpu, 1 process: $cpu"
status=0
if [ "$ngpu" -ge 2 ]; then
  for model in "gguf -f $OUT/llama-q8_0.gguf" "plain -m $OUT/llama"; do
    t0=$SECONDS
    got=$(timeout "$(left)" "$MRS" --tp 2 --device cuda "${args[@]}" $model 2>"$OUT/tp.err"); rc=$?
    echo "cuda --tp 2 ($model): rc=$rc, $((SECONDS - t0)) s: $got"; tail -3 "$OUT/tp.err"
    [ $rc -eq 0 ] || status=1
  done
  [ "$got" = "$(timeout "$(left)" "$MRS" --device cpu "${args[@]}" plain -m "$OUT/llama" 2>/dev/null)" ] \
    && echo "PASS: --tp 2 on 2 GPUs = the CPU's greedy text" || { echo "DIFF: --tp 2 on GPUs vs CPU"; status=1; }
  timeout "$(left)" "$PY" scripts/bench_tp.py --iters 200 --paper-only
else
  echo "SKIP: fewer than 2 GPUs; --tp 2 --device cuda needs one GPU per rank"
fi
exit $status
