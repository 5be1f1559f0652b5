# Sourced by the GPU check scripts (set OUT and STAGES first): stage selection, a timeline in $OUT, wheels from
# .whl/ for packages the offline machine lacks, the checkout on PYTHONPATH, and the machine's description.
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
t0=$(date +%s); stamp() { echo "[t+$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/timeline.txt"; }
. scripts/gpu_pythonpath.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/gpu.txt" 2>&1
# the training benchmark (both phases, synthetic tokens) once per value of one backend setting:
#   bench_arms FIELD LOGPREFIX VALUE...   ->  $OUT/LOGPREFIX_VALUE.{json,log}; needs PRESET and STEPS
bench_arms() {
  local field=$1 prefix=$2 arm; shift 2
  for arm in "$@"; do
    python3 -m golfnb.bench --preset "$PRESET" --steps "$STEPS" --data synthetic --set "$field=$arm" \
      --json "$OUT/${prefix}_$arm.json" > "$OUT/${prefix}_$arm.log" 2>&1
    stamp "bench $field=$arm (rc=$?)"
  done
}
stamp "start"
