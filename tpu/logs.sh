#!/usr/bin/env bash
# Streams the training log of one worker (default 0, the one that writes metrics).
#   bash tpu/logs.sh NAME ZONE [WORKER]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -eq 2 || $# -eq 3 ]] || usage "NAME ZONE [WORKER]"
on_workers "$1" "$2" "${3:-0}" "tail -n +1 -F ~/$REMOTE_LOG"
