#!/usr/bin/env bash
# Copies this checkout to every worker of a TPU VM and installs it, with JAX for TPU, into a
# Python 3.11 virtual environment (the TPU images ship Python 3.10).
#   bash tpu/setup.sh NAME ZONE
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -eq 2 ]] || usage "NAME ZONE"
name=$1 zone=$2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The working tree as git sees it (tracked and new files, nothing ignored such as workdirs/);
# a tracked file deleted but not yet committed stays behind, as in the working tree.
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard \
  | (cd "$repo" && while IFS= read -r -d '' path; do
      if [[ -e $path ]]; then printf '%s\0' "$path"; fi
    done) \
  | tar -C "$repo" --null -czf "$archive" -T -

gcloud compute tpus tpu-vm scp "$archive" "$name:thinkax.tar.gz" --zone="$zone" --worker=all
on_workers "$name" "$zone" all "
  set -e
  rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/thinkax.tar.gz -C ~/$REMOTE_DIR
  command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  export PATH=\$HOME/.local/bin:\$PATH
  [ -x ~/$REMOTE_VENV/bin/python ] || uv venv --python 3.11 ~/$REMOTE_VENV
  uv pip install --python ~/$REMOTE_VENV/bin/python -e ~/'${REMOTE_DIR}[tpu]'
  ~/$REMOTE_VENV/bin/python -c 'import jax; print(jax.devices())'
"
