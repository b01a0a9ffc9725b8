#!/usr/bin/bash
# Train a torchtitan config, in torchtitan's run_train.sh style.
#
#   MODEL=llama3 CONFIG=llama3_debugmodel_autoparallel ./run_train.sh [trainer flags...]
#
# Environment (all optional):
#   MODEL     torchtitan model whose registry holds CONFIG when it is not one of ours
#             (default llama3). MODULE, torchtitan's own name for it, is accepted too, so
#             torchtitan's scripts (e.g. scripts/loss_compare.py) drive this script unchanged.
#   CONFIG    config name; looked up in ./config_registry.py first, then in torchtitan's
#             registry for MODEL (default llama3_debugmodel_autoparallel).
#   NGPU      ranks to launch (default: the accelerators present; on CPU 2, or 1 on one core).
#   LOG_RANK  ranks whose output is shown, e.g. 0,1 (default 0).
#   COMM_MODE fake_backend: a dry run of an NGPU-rank plan in one process, no communication;
#             local_tensor: simulated ranks in one process. Both run 1 step unless you pass
#             --training.steps.
# Without an accelerator it trains on CPU with gloo (torchtitan_ext/cpu.py).
# Extra arguments go to the trainer (tyro): --training.steps 10, --autoparallel.alias_check warn
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON=${PYTHON:-python3}

MODEL=${MODEL:-${MODULE:-llama3}}
CONFIG=${CONFIG:-llama3_debugmodel_autoparallel}
export LOG_RANK=${LOG_RANK:-0}
COMM_MODE=${COMM_MODE:-}
NGPU=${NGPU:-}  # empty: the launcher counts the accelerators

# Finds CONFIG, checks the run before any rank starts (a bad flag, mesh or placement file
# fails here in a line or two, exit 1), then starts torchrun, or with COMM_MODE the one
# process (torchtitan_ext/launch.py).
export MODEL CONFIG NGPU COMM_MODE
exec "$PYTHON" -m torchtitan_ext.launch "$@"
