#!/usr/bin/env bash
# Creates a TPU VM (v5litepod-8, v6e-8: one host) or pod slice (v5p-32: four hosts).
#   bash tpu/create.sh NAME ZONE TYPE        e.g. bash tpu/create.sh thinkax us-west4-a v5litepod-8
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -eq 3 ]] || usage "NAME ZONE TYPE   (TYPE: v5litepod-8, v5p-32, v6e-8, ...)"
name=$1 zone=$2 type=$3
version=$(runtime_version "$type")

gcloud compute tpus tpu-vm create "$name" \
  --zone="$zone" \
  --accelerator-type="$type" \
  --version="$version"
