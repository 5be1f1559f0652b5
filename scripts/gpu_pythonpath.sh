# Sourced by the GPU scripts: wheels from .whl/ for packages the offline machine lacks (installed into /tmp/site),
# the checkout, and FlashAttention-4 where scripts/gpu_fa4_install.sh has put it on this machine, on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ -f "${FA4_SITE:-/tmp/fa4site}.path" ]; then export PYTHONPATH=$PYTHONPATH:$(cat "${FA4_SITE:-/tmp/fa4site}.path"); fi
