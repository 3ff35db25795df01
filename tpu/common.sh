#!/usr/bin/env bash
# Shared by the tpu/*.sh scripts: where the code and its Python live on every TPU worker.
# Sourced, not run.
# shellcheck disable=SC2034  # the variables are read by the scripts that source this file

REMOTE_DIR="thinkax"          # the project, relative to each worker's home
REMOTE_VENV="thinkax-venv"    # its Python 3.11 virtual environment
REMOTE_LOG="thinkax/train.log"
REMOTE_PID="thinkax/train.pid"

# usage MESSAGE: print how to call the script and exit with status 2.
usage() {
  echo "usage: $(basename "$0") $1" >&2
  exit 2
}

# runtime_version TYPE: the TPU software version for an accelerator type (v5litepod-8, v5p-32, v6e-8).
runtime_version() {
  case "$1" in
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *)
      echo "unsupported accelerator type '$1': use v5litepod-N (v5e), v5p-N or v6e-N" >&2
      return 1
      ;;
  esac
}

# on_workers NAME ZONE WORKER COMMAND: run a shell command on one worker (0, 1, ...) or "all".
on_workers() {
  gcloud compute tpus tpu-vm ssh "$1" --zone="$2" --worker="$3" --command="$4"
}
