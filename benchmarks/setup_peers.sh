#!/usr/bin/env bash
# Peer environments for side-by-side benchmarks, kept apart from prefalign's .venv so the
# peer's dependencies never mix with ours. Idempotent.
#   .bench/trl      trl (latest: DPOTrainer, SFTTrainer, RewardTrainer)
#   .bench/trl-ppo  trl==1.9.2 (the last release with a PPOTrainer, trl.experimental.ppo)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
make_env() {
  local dir=$1; shift
  if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import trl" 2>/dev/null; then
    $PYTHON -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q "$TORCH"
    "$dir/bin/python" -m pip install -q "$@" transformers datasets
  fi
  "$dir/bin/python" -c "import trl, transformers, torch; print('$dir: trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
}
make_env .bench/trl trl
make_env .bench/trl-ppo "trl==1.9.2"
