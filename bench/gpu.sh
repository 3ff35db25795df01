#!/usr/bin/env bash
# The GPU benchmark as one script: train-step MFU of the Llama-3.2-1B shape against the
# measured bf16 matmul peak at three row lengths (same tokens per step), then KV-cache
# decoding of the same model. Needs the package installed (pip install -e .) and one GPU.
#   bash bench/gpu.sh OUT_DIR
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$out"
for shape in "2048 2" "1024 4" "512 8"; do
  read -r seq_len rows <<<"$shape"
  python -m bench.train_step --sizes=llama3_1b --batch_sizes="llama3_1b:$rows" \
    --seq_len="$seq_len" --variants= --variant_size=llama3_1b --peak_n=8192 \
    --out="$out/train_step_seq$seq_len.json"
done
python -m bench.decode --model=llama3_1b --batch_sizes=1,64 --prompt_lens=128 \
  --new_tokens=128 --repeats=2 --peak_n=8192 --copy_mib=4096 --out="$out/decode.json"
