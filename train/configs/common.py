"""Pieces shared by every config file: variant parsing and the base config.

A config file is plain Python: `get_config(arg)` returns an `ml_collections.ConfigDict`.
Variants go after a colon on the command line, `--config=sft.py:tiny,format=answer_only`,
and reach `get_config` as the string `"tiny,format=answer_only"`.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from model.config import PRESETS, ModelConfig


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `"a=1,b,c=x"` into a ConfigDict over `defaults`; a bare name sets it to True.

    Unknown names raise, so a typo in a variant never silently runs the default.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config variant {key!r}; known variants: {sorted(defaults)}")
        default = defaults[key]
        if not value:
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes")
        else:
            parsed[key] = type(default)(value)
    return parsed


def typed_model_overrides() -> dict:
    """A typed, unset (None) override per ModelConfig field, so CLI values parse to its type."""
    reference = PRESETS["small"]
    types = {f.name: type(getattr(reference, f.name)) for f in dataclasses.fields(ModelConfig)}
    types["rope_scaling"] = tuple  # None in most presets
    return {name: config_dict.placeholder(kind) for name, kind in types.items()}


def base_config() -> ml_collections.ConfigDict:
    """Fields every objective's run shares: loop, optimizer, checkpoints, mesh, evaluation."""
    c = ml_collections.ConfigDict()
    c.objective = "sft"  # a name in train.objectives.OBJECTIVES
    c.seed = 0
    c.init_from = ""  # a workdir with checkpoints/, or a Hugging Face Llama directory
    c.init_from_step = 0  # which checkpoint of an init_from workdir; 0: its newest

    # Model: a preset from model.config.PRESETS; every ModelConfig field left None keeps the
    # preset's value, any other value overrides it (`--config.model.d_model=256`). A None
    # vocab_size takes the tokenizer's vocabulary size.
    c.model = ml_collections.ConfigDict({"preset": "small", **typed_model_overrides()})

    c.num_steps = 1000
    c.batch_size = 32  # global examples (packed rows) per optimizer step
    c.grad_accum_steps = 1  # batch_size is split into this many microbatches

    c.optimizer = ml_collections.ConfigDict(
        {
            "lr": 3e-3,
            "warmup_steps": 50,
            "end_lr_ratio": 0.1,  # cosine decays to lr * end_lr_ratio
            "b1": 0.9,
            "b2": 0.95,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "freeze": "",  # regex on "/"-joined parameter paths, e.g. "embed|layers/attn"
            # Parameters matching this regex train at lr * lr_mult (e.g. PPO's value head).
            "lr_mult_pattern": "",
            "lr_mult": 1.0,
        }
    )

    c.log_every = 10
    c.eval_every = 0  # 0: evaluate only at the end
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.keep_steps = ()  # checkpoint steps kept beyond the last keep_checkpoints
    c.async_checkpoint = True
    c.progress_bar = True

    c.eval = ml_collections.ConfigDict(
        {
            "split": "test",
            "num_problems": 256,  # 0: the whole split
            "batch_size": 64,
            "max_new_tokens": 256,
        }
    )

    # Mesh sizes for ("data", "fsdp", "tensor"); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = "fsdp"  # a name in model.sharding.RULES
    return c
