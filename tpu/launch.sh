#!/usr/bin/env bash
# Starts `python -m train.main` on every worker (in the background; see logs.sh, stop.sh).
#   bash tpu/launch.sh NAME ZONE CONFIG WORKDIR [--config.key=value ...]
# WORKDIR must be a gs:// URI that every host can write: checkpoints are written by all
# hosts together. The hosts find each other through --distributed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -ge 4 ]] || usage "NAME ZONE CONFIG WORKDIR [--config.key=value ...]"
name=$1 zone=$2 config=$3 workdir=$4
shift 4
[[ $workdir == gs://* ]] || {
  echo "WORKDIR must be gs://BUCKET/PATH (all hosts write it), got '$workdir'" >&2
  exit 2
}

# Quote each argument once, for the remote shell.
args=$(printf ' %q' "--config=$config" "--workdir=$workdir" --distributed "$@")
on_workers "$name" "$zone" all "
  cd ~/$REMOTE_DIR
  nohup ~/$REMOTE_VENV/bin/python -m train.main$args > ~/$REMOTE_LOG 2>&1 < /dev/null &
  echo \$! > ~/$REMOTE_PID
  echo \"\$(hostname): started train.main (pid \$!), log ~/$REMOTE_LOG\"
"
