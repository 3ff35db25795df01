#!/usr/bin/env bash
# Stops the run that launch.sh started, on every worker (the TPU VM keeps running).
#   bash tpu/stop.sh NAME ZONE
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -eq 2 ]] || usage "NAME ZONE"
on_workers "$1" "$2" all "[ -f ~/$REMOTE_PID ] && kill \$(cat ~/$REMOTE_PID) || true"
