"""Benchmarks: plain scripts that print one table of ratios measured in one process.

    python -m bench.train_step --out=bench/results/train_step.json
    python -m bench.decode     --out=bench/results/decode.json
    python -m bench.pipeline   --out=bench/results/pipeline.json

Modules:
  common      Hardware ceilings (matmul peaks, copy bandwidth), timing, flags, tables, JSON.
  train_step  Tokens/s and MFU of the jitted SFT train step, by model size and variant.
  decode      Rollout tokens/s: KV-cache sampler vs full recomputation vs the bandwidth bound.
  pipeline    Grain SFT pipeline throughput vs what the default SFT train step consumes.

Every script takes `--quick` (tiny settings, seconds) and writes its numbers as JSON to `--out`.
See bench/README.md for what each column means.
"""
