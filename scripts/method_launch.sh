#!/usr/bin/env bash
# Shared by the ft_*.sh scripts: `launch_methods PRESET SCRIPT ARGS...` runs `launch`
# (scripts/torchrun_launch.sh) once per method of METHOD, one after another, each with
# --preset PRESET and its seeds (SEEDS). The calling script sets WEIGHTS, DATA_PATH and
# OUTPUT_DIR; SCRIPT is recorded in each run's config.json (--script).
#   METHOD ("lora" or "full", the script's own): e.g. METHOD="lora vpt ssf"; any --method of
#     main_finetune_lora.py. LoRA runs on vit_base_patch16_lora with adapters on q and v (the
#     paper's lora_pos attn), every other method on vit_base_patch16. Each run is named by its
#     method (the automatic run name holds the method and its size, e.g. vpt-deep-p50); with
#     several methods a --run_name NAME among ARGS becomes NAME_<method> (and NAME_<method>_s<seed>
#     with several seeds). A method's own flags (--vpt_tokens 16) go to every method's run:
#     give them with one METHOD.
# A real run with several methods checks every method's flags (main_finetune_lora.py
# --check_args) before the first one starts, so a misspelt method stops nothing half-way.

source "$(dirname "${BASH_SOURCE[0]}")/torchrun_launch.sh"

# Problems of METHOD and ARGS that no run should start with: one line each.
_method_errors() {
  local methods method seen=" "
  read -ra methods <<< "${METHOD:-}"
  if (( ${#methods[@]} == 0 )); then
    echo "METHOD='${METHOD:-}': expected one or more methods separated by spaces, e.g. METHOD=\"lora vpt\""
    return
  fi
  for method in "${methods[@]}"; do
    if ! [[ $method =~ ^[a-z][a-z0-9_]*$ ]]; then
      echo "METHOD='$METHOD': expected method names separated by spaces, e.g. METHOD=\"lora vpt\""
      return
    fi
    if [[ $seen == *" $method "* ]]; then
      echo "METHOD='$METHOD': expected different methods; $method is listed twice (its second run would replace or refuse the first)"
      return
    fi
    seen+="$method "
  done
  if _has_flag --method "$@"; then
    echo "--method $(_flag_value --method "$@") with METHOD='$METHOD' would give every run that method: set METHOD only"
  fi
  if (( ${#methods[@]} > 1 )) && _has_flag --run_name "$@" && [ -z "$(_flag_value --run_name "$@")" ]; then
    echo "--run_name '' (the --output_dir itself) with METHOD='$METHOD' would put every method in one folder: give a name (each method gets <name>_<method>) or leave --run_name out"
  fi
}

# The arguments of one method's runs: model, LoRA's positions, and ARGS with a given
# --run_name NAME made NAME_<method> when there are several methods.
_method_args() {
  local method=$1 several=$2 prev="" arg
  shift 2
  if [ "$method" = lora ]; then
    _args=(--method lora --model vit_base_patch16_lora --lora_pos attn)
  else
    _args=(--method "$method" --model vit_base_patch16)
  fi
  _rest=()
  for arg in "$@"; do
    if (( several )); then
      if [ "$prev" = --run_name ] && [ "$arg" != auto ]; then
        arg=${arg}_$method
      elif [[ $arg == --run_name=* && $arg != --run_name=auto ]]; then
        arg=${arg}_$method
      fi
    fi
    _rest+=("$arg")
    prev=$arg
  done
}

launch_methods() {
  local preset=$1 script=$2 methods method errors several=0 _args _rest
  shift 2
  errors=$(_method_errors "$@") || true
  if [ -n "$errors" ]; then
    sed 's/^/error: /' <<< "$errors" >&2
    return 2
  fi
  read -ra methods <<< "$METHOD"
  (( ${#methods[@]} > 1 )) && several=1
  local common=(--preset "$preset" --finetune "$WEIGHTS" --data_path "$DATA_PATH"
                --output_dir "$OUTPUT_DIR" --num_workers 10 --dist_eval --script "$script")
  if (( several )) && [ "${DRY_RUN:-0}" != 1 ] && [ -z "$(_launch_setting_errors)" ] \
      && [ -z "$(_launch_problems "$@")" ]; then
    for method in "${methods[@]}"; do
      _method_args "$method" "$several" "$@"
      WORLD_SIZE=$(( ${NGPUS:-1} * ${NNODES:-1} )) "${PYTHON:-python3}" "$LAUNCH_REPO/main_finetune_lora.py" \
        --check_args --global_batch "${GLOBAL_BATCH:-64}" "${common[@]}" "${_args[@]}" "${_rest[@]}" \
        || return 2
    done
  fi
  for method in "${methods[@]}"; do
    _method_args "$method" "$several" "$@"
    launch "${common[@]}" "${_args[@]}" "${_rest[@]}" || return $?
  done
}
