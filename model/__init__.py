"""The Llama-architecture decoder, its sharding rules, KV-cache sampler and weight import/export.

Modules:
  config       ModelConfig, presets (tiny ... llama3_8b), parameter and FLOP counts.
  transformer  The Flax (Linen) decoder: packed sequences, explicit KV cache, scalar heads.
  sharding     Logical-axis rules, the device mesh, sharded init and activation constraints.
  sampler      Jitted prefill + `lax.while_loop` decoding, cache forking, log-prob scoring.
  hf           Hugging Face Llama checkpoints in and out.

Tensor names carry their shape as a suffix (`x_BxLxD`, `logits_BxLxV`). The letters:

  B  batch (rows)                 H   query heads
  L  length (tokens in this call) K   key/value heads (grouped-query attention)
  S  cache length (key slots)     G   query heads per key/value head (H // K)
  P  prompt length (padded)       Dh  head dim
  T  new tokens (decode steps)    F   MLP hidden dim
  D  d_model (embedding dim)      V   vocabulary size
  N  samples per prompt           Y   layers (the scanned axis)
  R  rotary frequency pairs (Dh // 2)
"""
