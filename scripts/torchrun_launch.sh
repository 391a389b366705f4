#!/usr/bin/env bash
# Shared by the ft_*.sh scripts: `launch ARGS...` runs main_finetune_lora.py under torchrun
# with ARGS, once per seed. The calling script sets WEIGHTS and DATA_PATH; the rest comes
# from the environment:
#   NGPUS (processes on this node, default 1), NNODES (1), NODE_RANK (0),
#   MASTER_ADDR (127.0.0.1), MASTER_PORT (29500);
#   GLOBAL_BATCH (64, the paper's 1 GPU x 64): images per optimizer step over all processes,
#     split evenly over them so that the lr, the steps per epoch and the gradient stay the
#     paper's; set it (e.g. GLOBAL_BATCH=256) to train with a bigger batch on purpose;
#   SEEDS ("0"): seeds run one after another, e.g. SEEDS="0 1 2", each in its own run folder;
#   DRY_RUN=1 prints the command(s) instead, and reports on stderr what a real run would
#     stop on.
# A real run stops before torchrun, one line per problem, when the weights file or the data
# folder is missing or the global batch does not divide over the processes.

_launch_problems() {
  local processes=$(( ${NGPUS:-1} * ${NNODES:-1} ))
  if [ ! -f "$WEIGHTS" ]; then
    echo "weights file '$WEIGHTS' not found (WEIGHTS=...): see pretrained_weights/README.md for where to get $(basename "$WEIGHTS")"
  fi
  if [ ! -d "$DATA_PATH" ]; then
    echo "data folder '$DATA_PATH' not found (DATA_PATH=...): see docs/REPRODUCE.md for the images and split files it needs"
  fi
  if (( GLOBAL_BATCH % processes )); then
    local fits=() n
    for (( n = 1; n <= GLOBAL_BATCH && ${#fits[@]} < 6; n++ )); do
      (( GLOBAL_BATCH % n )) || fits+=("$n")
    done
    echo "GLOBAL_BATCH=$GLOBAL_BATCH does not divide over $processes processes (NGPUS=${NGPUS:-1} x NNODES=${NNODES:-1}): use ${fits[*]} processes, or set GLOBAL_BATCH to a multiple of $processes (this changes the paper's recipe)"
  fi
}

launch() {
  GLOBAL_BATCH=${GLOBAL_BATCH:-64}
  local seeds=${SEEDS:-0} name value seed
  for name in NGPUS NNODES GLOBAL_BATCH; do
    value=${!name:-1}
    if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
      echo "error: $name='$value': expected a positive whole number" >&2
      return 2
    fi
  done
  for seed in $seeds; do
    if ! [[ $seed =~ ^[0-9]+$ ]]; then
      echo "error: SEEDS='$SEEDS': expected whole numbers separated by spaces, e.g. SEEDS=\"0 1 2\"" >&2
      return 2
    fi
  done

  local problems
  problems=$(_launch_problems)
  if [ -n "$problems" ]; then
    if [ -n "${DRY_RUN:-}" ]; then
      sed 's/^/note: a real run would stop here: /' <<< "$problems" >&2
    else
      sed 's/^/error: /' <<< "$problems" >&2
      return 2
    fi
  fi

  if [ -z "${DRY_RUN:-}" ]; then
    # Bad flags stop here with the entry script's one-line error, not under torchrun's
    # traceback of the failed child process.
    WORLD_SIZE=$(( ${NGPUS:-1} * ${NNODES:-1} )) "${PYTHON:-python3}" main_finetune_lora.py \
      --check_args --global_batch "$GLOBAL_BATCH" "$@" || return 2
  fi

  for seed in $seeds; do
    # The seed goes before ARGS so that a script's extra arguments (last) still win.
    local cmd=(torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
               --nproc_per_node "${NGPUS:-1}"
               --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
               main_finetune_lora.py --global_batch "$GLOBAL_BATCH" --seed "$seed" "$@")
    if [ -n "${DRY_RUN:-}" ]; then
      printf '%q ' "${cmd[@]}"
      echo
    else
      "${cmd[@]}" || return
    fi
  done
}
