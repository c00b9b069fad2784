#!/usr/bin/env bash
# One GPU session of the benchmark: install the carried wheels, check the stack, build the random 8B checkpoint
# in /dev/shm, run the suites given as arguments ("TIMEOUT_S DATA VARIANTS [extra suite args]" strings), then
# pack every log into $OUT/bench.tgz (the device tool brings back at most 8 files).
#   bash bench/gpu.sh "300 fixed seeds,scalesft --steps 14" "200 var seeds,scalesft"
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/bench_out}; R=/tmp/bench_r; mkdir -p "$R" "$OUT"
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # scalesft from this checkout (scalesft/__init__.py)
python3 - <<'PY' 2>&1 | tee "$R/env.txt"
import importlib, torch
print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.device_count())
for m in ["transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "liger_kernel", "triton", "flash_attn"]:
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:
        print(m, "MISSING", type(e).__name__, str(e)[:100])
PY
MODEL=/dev/shm/llama8b
[ -f $MODEL/config.json ] || python3 bench/bench.py make $MODEL 2>&1 | tail -3
i=0
for s in "$@"; do
  i=$((i+1)); set -- $s; to=$1; data=$2; variants=$3; shift 3
  timeout $to python3 bench/bench.py suite $MODEL --out $R/s$i --data $data --variants $variants "$@" \
    2>&1 | grep -v "it/s\]\|s/it\]\|examples/s\]" | tail -40
done
cat $R/s*/results.md > "$OUT/results.md" 2>/dev/null
python3 - "$R" "$OUT/results.json" <<'PY'
import json, sys, glob
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/s*/results.json")):
    rows += json.load(open(f))
json.dump(rows, open(sys.argv[2], "w"), indent=1)
PY
find "$R" -name work -type d -prune -exec rm -rf {} + ; cp $R/s*/profile_*.md "$OUT/" 2>/dev/null
tar czf "$OUT/bench.tgz" -C "$R" . 2>/dev/null
cat $R/s*/profile_*.md 2>/dev/null | head -80
cat "$OUT/results.md"
