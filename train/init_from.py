"""`config.init_from`: start from another run's checkpoint or from Hugging Face weights.

Later stages begin where SFT ended: a reward model or a PPO policy sets
`init_from=<sft workdir>`, takes its model config, parameters and tokenizer, and adds the
scalar heads it needs (freshly initialized). A Hugging Face Llama directory works the same
way through model.hf; its sentencepiece `tokenizer.model`, if present, is adapted to the
thinking markers and the embeddings grow to the new vocabulary.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax

from train import checkpoint
from train import workdir as workdir_lib

HEAD_KEYS = ("value_head", "reward_head")


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where initial parameters come from."""

    kind: str  # "workdir" or "hf"
    path: str


def find_source(init_from: str) -> InitSource | None:
    """Classifies `config.init_from`; raises with a clear message if it is neither kind."""
    if not init_from:
        return None
    if os.path.isdir(os.path.join(init_from, "checkpoints")):
        return InitSource("workdir", init_from)
    if os.path.exists(os.path.join(init_from, "config.json")) and glob.glob(
        os.path.join(init_from, "*.safetensors")
    ):
        return InitSource("hf", init_from)
    raise FileNotFoundError(
        f"init_from={init_from!r} is neither a train.main workdir (with checkpoints/) nor a "
        "Hugging Face directory (config.json + *.safetensors)"
    )


def prepare_tokenizer(source: InitSource | None, workdir: str) -> None:
    """Puts the source's tokenizer into `workdir` before data preparation reads it."""
    if source is None or os.path.exists(os.path.join(workdir, workdir_lib.TOKENIZER_FILE)):
        return
    if source.kind == "workdir":
        workdir_lib.copy_tokenizer(source.path, workdir)
        return
    spm = os.path.join(source.path, "tokenizer.model")
    if not os.path.exists(spm):
        raise FileNotFoundError(
            f"{source.path} has no sentencepiece tokenizer.model; set data.tokenizer_path to one"
        )
    from data.tokenizer import adapt_tokenizer

    tokenizer, added = adapt_tokenizer(spm)
    if jax.process_index() == 0:
        tokenizer.save(os.path.join(workdir, workdir_lib.TOKENIZER_FILE))
        print(f"Adapted {spm}: added {added} special tokens, vocab size {tokenizer.vocab_size}")


# Fields a run may change on top of the source's architecture.
NUMERICS_FIELDS = ("dtype", "remat", "scan_layers", "max_seq_len")


def source_model_config(source: InitSource | None, model_overrides, vocab_size: int):
    """The source's ModelConfig, with this run's numerics overrides (None without a source)."""
    if source is None:
        return None
    if source.kind == "workdir":
        cfg = workdir_lib.model_config_of(workdir_lib.read_config(source.path))
    else:
        import json

        from model.hf import config_from_hf

        with open(os.path.join(source.path, "config.json")) as f:
            cfg = config_from_hf(json.load(f))
    numerics = {k: model_overrides[k] for k in NUMERICS_FIELDS if model_overrides[k] is not None}
    cfg = dataclasses.replace(cfg, **numerics)
    if cfg.vocab_size < vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)  # grown in load_params below
    return cfg


def load_params(source: InitSource, model_cfg, fresh_params):
    """Source parameters placed like `fresh_params`; heads the source lacks stay fresh."""
    if source.kind == "workdir":
        loaded, _ = checkpoint.load_params(source.path)
    else:
        from model import hf

        hf_cfg, loaded = hf.load_llama(source.path, scan_layers=model_cfg.scan_layers)
        if hf_cfg.vocab_size < model_cfg.vocab_size:
            _, loaded = hf.resize_embeddings(hf_cfg, loaded, model_cfg.vocab_size)
    trunk = {k: v for k, v in loaded.items() if k not in HEAD_KEYS}
    missing = set(fresh_params) - set(trunk) - set(HEAD_KEYS)
    if missing:
        raise ValueError(f"init_from={source.path} lacks parameters {sorted(missing)}")
    params = dict(fresh_params)
    for key, subtree in trunk.items():
        if key not in fresh_params:
            continue
        target = fresh_params[key]
        jax.tree.map(_check_shape(key), subtree, target)
        params[key] = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), subtree, target)
    return params


def _check_shape(key):
    def check(x, target):
        if x.shape != target.shape:
            raise ValueError(
                f"init_from: {key} has shape {x.shape}, the model wants {target.shape}"
            )

    return check
