#!/usr/bin/env bash
# The GPU benchmark as one script: train-step MFU of the Llama-3.2-1B shape against the
# measured bf16 matmul peak, materialized (einsum) against cuDNN's fused attention at three
# row lengths (same tokens per step), then fused attention at 8 x 2048 (packed and unpacked
# rows; the einsum runs out of memory there), then KV-cache decoding of the same model.
# Needs the package installed (pip install -e .) and one NVIDIA GPU.
#   bash bench/gpu.sh OUT_DIR
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$out"
bench=(python -m bench.train_step --variant_size=llama3_1b --variants=cudnn --peak_n=8192)
for shape in "2048 2" "1024 4" "512 8"; do
  read -r seq_len rows <<<"$shape"
  "${bench[@]}" --sizes=llama3_1b --batch_sizes="llama3_1b:$rows" --seq_len="$seq_len" \
    --out="$out/train_step_seq${seq_len}_b$rows.json"
done
for segments in 4 0; do
  "${bench[@]}" --sizes= --batch_sizes=llama3_1b:8 --seq_len=2048 --segments_per_row=$segments \
    --out="$out/train_step_seq2048_b8_cudnn_segments$segments.json"
done
python -m bench.decode --model=llama3_1b --batch_sizes=1,64 --prompt_lens=128 \
  --new_tokens=128 --repeats=2 --peak_n=8192 --copy_mib=4096 --out="$out/decode.json"
