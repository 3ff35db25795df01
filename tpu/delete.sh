#!/usr/bin/env bash
# Deletes the TPU VM or pod slice (the gs:// workdir stays).
#   bash tpu/delete.sh NAME ZONE
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -eq 2 ]] || usage "NAME ZONE"
gcloud compute tpus tpu-vm delete "$1" --zone="$2" --quiet
