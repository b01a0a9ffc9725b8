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
if [ -z "${NGPU:-}" ]; then
    NGPU=$("$PYTHON" -c "import torch; print(torch.accelerator.device_count())" 2>/dev/null || echo 0)
    if [ "$NGPU" -eq 0 ]; then
        NGPU=$(( $(nproc) >= 2 ? 2 : 1 ))
    fi
fi

# The module that defines CONFIG (ours or torchtitan's); lists the choices if none does.
TRAIN_MODULE=$("$PYTHON" -m torchtitan_ext.launch "$MODEL" "$CONFIG")

if [ -n "$COMM_MODE" ]; then
    echo "Running with comm_mode=${COMM_MODE} (NGPU=${NGPU}, one process)"
    NGPU="$NGPU" LOCAL_RANK=0 "$PYTHON" -m torchtitan_ext.train \
        --module "$TRAIN_MODULE" --config "$CONFIG" \
        --comm.mode="$COMM_MODE" --training.steps 1 "$@"
else
    PYTORCH_ALLOC_CONF="expandable_segments:True" \
    "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPU" \
        --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
        --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
        -m torchtitan_ext.train --module "$TRAIN_MODULE" --config "$CONFIG" "$@"
fi
