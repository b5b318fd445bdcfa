#!/usr/bin/env bash
# CI step: a GPU user's install, on a machine without a GPU (build and import only).
# In a second virtual environment: the CUDA build of torch ($CUDA_TORCH, default torch==2.14.1, a
# cu130 wheel), then the README's "GPU install" commands with NO CUDA_HOME / CUDA_PATH set. Checks
# that the installed torch was kept, that dit_fast._C_cuda was built (DIT_FAST_FORCE_CUDA_BUILD=1
# makes a failed build fail the install) and imports, and that every op with a CUDA kernel is
# registered (.ci/check_cuda_ext.py). The environment takes ~6 GB: with less than $MIN_FREE_GB
# (default 10) GB free in ${TMPDIR:-/tmp} the step is skipped with one line (exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_TORCH=${CUDA_TORCH:-torch==2.14.1}
MIN_FREE_GB=${MIN_FREE_GB:-10}
PARENT=${TMPDIR:-/tmp}
START=$(date +%s)
log() { echo "[cuda_build $(($(date +%s) - START))s] $*"; }

free_gb=$(($(df -Pk "$PARENT" | awk 'NR == 2 {print $4}') / 1048576))
if ((free_gb < MIN_FREE_GB)); then
    echo "CUDA build check: SKIPPED (${free_gb} GB free in $PARENT, it needs ${MIN_FREE_GB} GB)"
    exit 0
fi
WORK=$(mktemp -d "$PARENT/dit_fast-ci-cuda.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# A copy of the sources: building in place here would overwrite this checkout's dit_fast/_C*.so,
# which the main test environment (another torch) uses.
mkdir "$WORK/src"
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/src"

python -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
log "installing $CUDA_TORCH into a fresh venv"
pip install -q "$CUDA_TORCH"
torch_before=$(python -c 'import torch; print(torch.__version__, torch.version.cuda)')
log "torch: $torch_before"
case $torch_before in *" None") echo "CUDA build check: FAILED ($CUDA_TORCH is not a CUDA build)"; exit 1 ;; esac

cd "$WORK/src"
log "README GPU install (no CUDA_HOME, MAX_JOBS=${MAX_JOBS:-2})"
unset CUDA_HOME CUDA_PATH
export MAX_JOBS=${MAX_JOBS:-2} DIT_FAST_FORCE_CUDA_BUILD=1
pip install -q -r requirements.txt && pip install -q -e . --no-build-isolation
torch_after=$(python -c 'import torch; print(torch.__version__, torch.version.cuda)')
if [ "$torch_after" != "$torch_before" ]; then
    echo "CUDA build check: FAILED (the install replaced torch $torch_before with $torch_after)"
    exit 1
fi
python - <<'PY'
import json
for name, v in json.load(open("dit_fast/_build.json")).items():
    print(f"  {name}: {v['status']} ({v['detail']})")
PY
python .ci/check_cuda_ext.py
log "disk: $(du -sh "$WORK" | cut -f1) in $WORK"
echo "CUDA build check: ok in $(($(date +%s) - START))s (torch $torch_after kept, dit_fast._C_cuda built and imported)"
