#!/usr/bin/env bash
# Shared by the ft_*.sh scripts: `launch ARGS...` runs main_finetune_lora.py with ARGS, once
# per seed. The calling script sets WEIGHTS, DATA_PATH, DATASET and DATA_SIZE; the rest comes
# from the environment:
#   NGPUS (processes on this node, default 1), NNODES (1), NODE_RANK (0), MASTER_ADDR and
#     MASTER_PORT (multi-node only: the address and a free port of the node with NODE_RANK=0);
#   GLOBAL_BATCH (64, the paper's 1 GPU x 64): images per optimizer step over all processes,
#     split evenly over them so that the lr, the steps per epoch and the gradient stay the
#     paper's; set it (e.g. GLOBAL_BATCH=256) to train with a bigger batch on purpose;
#   SEEDS ("0"): seeds run one after another, e.g. SEEDS="0 1 2", each in its own run folder
#     (a --run_name NAME among ARGS becomes NAME_s<seed> for each seed when there are several);
#   DRY_RUN=1 prints the command(s) instead, and reports on stderr what a real run would
#     stop on.
# How it runs: one process (NGPUS=1, NNODES=1) runs python directly, so an error of the entry
# script is the last thing printed; several processes on one node run under
# `torchrun --standalone`, which takes a free port (two runs on one machine do not collide);
# with NNODES > 1, or MASTER_ADDR / MASTER_PORT set, torchrun uses MASTER_ADDR (127.0.0.1) and
# MASTER_PORT (29500) on every node.
# A real run stops before anything starts, one line per problem naming the variable at fault,
# when a setting is not one the scripts know, the weights file or the data folder is missing,
# the data folder's split files belong to another data set than DATASET, or the global batch
# does not divide over the processes.

# The repository: main_finetune_lora.py and the scripts' default paths live here.
LAUNCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAUNCH_DATASETS="nih chexpert rsna"

# Labels per split-file line of data set $1 (datasets/constants.py), to tell them apart.
_labels_of() {
  case $1 in nih) echo 14 ;; chexpert) echo 5 ;; rsna) echo 1 ;; esac
}

# A path made absolute against the current directory (it need not exist).
_abs_path() {
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/${1#./}" ;;
  esac
}

# The value of flag $1 among the remaining arguments (the last one given), or nothing.
_flag_value() {
  local name=$1 prev="" a value=""
  shift
  for a in "$@"; do
    [ "$prev" = "$name" ] && value=$a
    [[ $a == "$name"=* ]] && value=${a#"$name"=}
    prev=$a
  done
  printf '%s' "$value"
}

# Whether flag $1 is among the remaining arguments.
_has_flag() {
  local name=$1 a
  shift
  for a in "$@"; do
    [[ $a == "$name" || $a == "$name"=* ]] && return 0
  done
  return 1
}

# Settings that are not one of the allowed values: one line each, naming the variable.
_launch_setting_errors() {
  local name value seed seen=" "
  for name in NGPUS NNODES GLOBAL_BATCH; do
    value=${!name:-1}
    if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
      echo "$name='$value': expected a positive whole number"
    fi
  done
  if ! [[ ${DRY_RUN:-0} =~ ^[01]$ ]]; then
    echo "DRY_RUN='$DRY_RUN': expected 1 (print the commands) or 0 (run them)"
  fi
  value=${NODE_RANK:-0}
  if ! [[ $value =~ ^[0-9]+$ ]] || { [[ ${NNODES:-1} =~ ^[0-9]+$ ]] && (( value >= ${NNODES:-1} )); }; then
    echo "NODE_RANK='$value': expected 0 to NNODES-1 (NNODES=${NNODES:-1})"
  fi
  if [ -n "${DATASET+set}" ] && ! [[ " $LAUNCH_DATASETS " == *" $DATASET "* ]]; then
    echo "DATASET='$DATASET': expected one of ${LAUNCH_DATASETS// /, }"
  fi
  if [ -n "${DATA_SIZE+set}" ] && ! [[ $DATA_SIZE =~ ^(1|10|100)%?$ ]]; then
    echo "DATA_SIZE='$DATA_SIZE': expected 1, 10 or 100 (% of the training labels)"
  fi
  local seeds
  read -ra seeds <<< "${SEEDS:-0}"
  for seed in "${seeds[@]}"; do
    if ! [[ $seed =~ ^[0-9]+$ ]]; then
      echo "SEEDS='$SEEDS': expected whole numbers separated by spaces, e.g. SEEDS=\"0 1 2\""
      return
    fi
    if [[ $seen == *" $seed "* ]]; then
      echo "SEEDS='$SEEDS': expected different seeds; seed $seed is listed twice (its second run would replace or refuse the first)"
      return
    fi
    seen+="$seed "
  done
}

# ARGS that would make several seeds write one run folder or train one seed.
_launch_seed_errors() {
  local seeds
  read -ra seeds <<< "${SEEDS:-0}"
  (( ${#seeds[@]} > 1 )) || return 0
  if _has_flag --seed "$@"; then
    echo "--seed $(_flag_value --seed "$@") with SEEDS='$SEEDS' would give every run that seed: set SEEDS only"
  fi
  if _has_flag --run_name "$@" && [ -z "$(_flag_value --run_name "$@")" ]; then
    echo "--run_name '' (the --output_dir itself) with SEEDS='$SEEDS' would put every seed in one folder: give a name (each seed gets <name>_s<seed>) or leave --run_name out"
  fi
}

# The data set whose label count the training split file of DATA_SIZE has, when it is not DATASET.
_dataset_mismatch() {
  [ -n "${DATASET:-}" ] && [ -n "${DATA_SIZE:-}" ] && [ -d "$DATA_PATH" ] || return 0
  local size=${DATA_SIZE%\%} split_dir folders=() folder name file="" labels kind split
  split_dir=$(_flag_value --split_dir "$@")
  if [ -n "$split_dir" ]; then
    folders=("$split_dir")
  else
    # As datasets/splits.py searches: the data folder, then DatasetsSplits/<its name>.
    folders=("$DATA_PATH" "$LAUNCH_REPO/DatasetsSplits/$(basename "$(cd "$DATA_PATH" && pwd)")")
  fi
  case $size in 1) name=train_1.txt ;; 10) name=train_10.txt ;; *) name=train_list.txt ;; esac
  # The split folder is the first that holds any of the five files; its train file is read.
  for folder in "${folders[@]}"; do
    for split in train_1 train_10 train_list val_list test_list; do
      [ -f "$folder/$split.txt" ] && file=$folder/$name
    done
    [ -n "$file" ] && break
  done
  [ -n "$file" ] && [ -f "$file" ] || return 0
  labels=$(awk 'NF { print NF - 1; exit }' "$file")
  for kind in $LAUNCH_DATASETS; do
    if [ "$(_labels_of "$kind")" = "$labels" ] && [ "$kind" != "$DATASET" ]; then
      echo "DATASET=$DATASET does not fit DATA_PATH='$(_abs_path "$DATA_PATH")': its split file $(_abs_path "$file") has $labels labels a line, as $kind has ($DATASET has $(_labels_of "$DATASET")): set DATASET=$kind, or DATA_PATH to a $DATASET data folder"
    fi
  done
  return 0
}

# What would stop a real run after the settings are valid: one line each.
_launch_problems() {
  local processes=$(( ${NGPUS:-1} * ${NNODES:-1} ))
  if [ ! -f "$WEIGHTS" ]; then
    echo "weights file '$(_abs_path "$WEIGHTS")' not found (WEIGHTS=$WEIGHTS): see pretrained_weights/README.md for where to get $(basename "$WEIGHTS")"
  fi
  if [ ! -d "$DATA_PATH" ]; then
    echo "data folder '$(_abs_path "$DATA_PATH")' not found (DATA_PATH=$DATA_PATH): see docs/REPRODUCE.md for the images and split files it needs"
  fi
  _dataset_mismatch "$@"
  if (( GLOBAL_BATCH % processes )); then
    local fits=() n
    for (( n = 1; n <= GLOBAL_BATCH && ${#fits[@]} < 8; n++ )); do
      (( GLOBAL_BATCH % n )) || fits+=("$n")
    done
    echo "GLOBAL_BATCH=$GLOBAL_BATCH does not divide over $processes processes (NGPUS=${NGPUS:-1} x NNODES=${NNODES:-1}): use ${fits[*]} processes, or set GLOBAL_BATCH to a multiple of $processes (this changes the paper's recipe)"
  fi
}

launch() {
  GLOBAL_BATCH=${GLOBAL_BATCH:-64}
  local seeds main="$LAUNCH_REPO/main_finetune_lora.py" errors problems seed arg
  read -ra seeds <<< "${SEEDS:-0}"
  errors=$(_launch_setting_errors; _launch_seed_errors "$@") || true
  if [ -n "$errors" ]; then
    sed 's/^/error: /' <<< "$errors" >&2
    return 2
  fi

  problems=$(_launch_problems "$@") || true
  if [ -n "$problems" ]; then
    if [ "${DRY_RUN:-0}" = 1 ]; then
      sed 's/^/note: a real run would stop here: /' <<< "$problems" >&2
    else
      sed 's/^/error: /' <<< "$problems" >&2
      return 2
    fi
  fi

  if [ "${DRY_RUN:-0}" != 1 ]; then
    # Bad flags stop here with the entry script's one-line error, not under torchrun's
    # traceback of the failed child process.
    WORLD_SIZE=$(( ${NGPUS:-1} * ${NNODES:-1} )) "${PYTHON:-python3}" "$main" \
      --check_args --global_batch "$GLOBAL_BATCH" "$@" || return 2
  fi

  local runner=()
  if (( ${NGPUS:-1} * ${NNODES:-1} == 1 )); then
    runner=("${PYTHON:-python3}")
  elif (( ${NNODES:-1} == 1 )) && [ -z "${MASTER_ADDR:-}${MASTER_PORT:-}" ]; then
    runner=(torchrun --standalone --nproc_per_node "${NGPUS:-1}")
  else
    runner=(torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
            --nproc_per_node "${NGPUS:-1}"
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
  fi

  for seed in "${seeds[@]}"; do
    # Several seeds must not share a run folder: a given --run_name gets the seed appended.
    local args=() prev=""
    for arg in "$@"; do
      if (( ${#seeds[@]} > 1 )); then
        if [ "$prev" = --run_name ] && [ "$arg" != auto ]; then
          arg=${arg}_s$seed
        elif [[ $arg == --run_name=* && $arg != --run_name=auto ]]; then
          arg=${arg}_s$seed
        fi
      fi
      args+=("$arg")
      prev=$arg
    done
    # The seed goes before ARGS so that a script's extra arguments (last) still win.
    local cmd=("${runner[@]}" "$main" --global_batch "$GLOBAL_BATCH" --seed "$seed" "${args[@]}")
    if [ "${DRY_RUN:-0}" = 1 ]; then
      printf '%q ' "${cmd[@]}"
      echo
    else
      local rc=0
      "${cmd[@]}" || rc=$?
      if (( rc )); then
        if [ "${runner[0]}" = torchrun ]; then
          # torchrun's report of the failed process ends the output; the cause is above it.
          echo "error: seed $seed stopped (exit $rc): main_finetune_lora.py's own error is printed above torchrun's report" >&2
        fi
        return $rc
      fi
    fi
  done
}
