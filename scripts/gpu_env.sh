# Sourced by the GPU check scripts (set OUT and STAGES first): stage selection, a timeline in $OUT, wheels from
# .whl/ for packages the offline machine lacks, the checkout on PYTHONPATH, and the machine's description.
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
t0=$(date +%s); stamp() { echo "[t+$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/timeline.txt"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/gpu.txt" 2>&1
stamp "start"
