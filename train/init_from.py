"""`config.init_from`: start from another run's checkpoint or from Hugging Face weights.

Later stages begin where SFT ended: a reward model or a PPO policy sets
`init_from=<sft workdir>`, takes its model config, parameters and tokenizer, and adds the
scalar heads it needs (freshly initialized). A Hugging Face Llama directory works the same
way through model.hf; its sentencepiece `tokenizer.model`, if present, is adapted to the
thinking markers and the embeddings grow to the new vocabulary. A workdir may be local or a
gs:// URI (every file goes through `etils.epath`); a Hugging Face directory must be local,
because safetensors and sentencepiece read local files.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from etils import epath

from data.build import is_remote
from train import checkpoint
from train import workdir as workdir_lib

HEAD_KEYS = ("value_head", "reward_head")


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where initial parameters come from."""

    kind: str  # "workdir" or "hf"
    path: str
    step: int | None = None  # a workdir's checkpoint step; None: its newest


def is_huggingface_dir(path: str) -> bool:
    """A Hugging Face checkpoint directory (config.json + *.safetensors), local or remote."""
    directory = epath.Path(path)
    return (directory / "config.json").exists() and any(directory.glob("*.safetensors"))


def find_source(init_from: str, step: int = 0) -> InitSource | None:
    """Classifies `config.init_from` (`step`: its checkpoint, 0 for the newest); raises with a
    clear message if it is neither kind."""
    if not init_from:
        return None
    if step < 0:
        raise ValueError(f"init_from_step must be >= 0 (0: the newest checkpoint), got {step}")
    path = epath.Path(init_from)
    if (path / "checkpoints").is_dir():
        return InitSource("workdir", init_from, step or None)
    if step:
        raise ValueError(
            f"init_from_step={step} needs a train.main workdir; {init_from!r} is not one"
        )
    if is_huggingface_dir(init_from):
        if is_remote(init_from):
            raise ValueError(
                f"init_from={init_from!r} is a Hugging Face directory in cloud storage; copy it "
                "to a local folder first (safetensors reads local files only)"
            )
        return InitSource("hf", init_from)
    raise FileNotFoundError(
        f"init_from={init_from!r} is neither a train.main workdir (with checkpoints/) nor a "
        "Hugging Face directory (config.json + *.safetensors)"
    )


def prepare_tokenizer(source: InitSource | None, workdir: str) -> None:
    """Puts the source's tokenizer into `workdir` before data preparation reads it."""
    target = epath.Path(workdir) / workdir_lib.TOKENIZER_FILE
    if source is None or target.exists():
        return
    if source.kind == "workdir":
        workdir_lib.copy_tokenizer(source.path, workdir)
        return
    spm = epath.Path(source.path) / "tokenizer.model"
    if not spm.exists():
        raise FileNotFoundError(
            f"{source.path} has no sentencepiece tokenizer.model; set data.tokenizer_path to one"
        )
    from data.tokenizer import adapt_tokenizer

    tokenizer, added = adapt_tokenizer(os.fspath(spm))
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tokenizer.proto_bytes)
        print(f"Adapted {spm}: added {added} special tokens, vocab size {tokenizer.vocab_size}")


# Fields a run may change on top of the source's architecture (numerics, and how the reward
# head reads the trunk).
NUMERICS_FIELDS = ("dtype", "remat", "scan_layers", "max_seq_len", "reward_surprise_window")


def source_model_config(source: InitSource | None, model_overrides, vocab_size: int):
    """The source's ModelConfig, with this run's numerics overrides (None without a source)."""
    if source is None:
        return None
    if source.kind == "workdir":
        cfg = workdir_lib.model_config_of(workdir_lib.read_config(source.path))
    else:
        from model.hf import config_from_hf

        cfg = config_from_hf(json.loads((epath.Path(source.path) / "config.json").read_text()))
    numerics = {k: model_overrides[k] for k in NUMERICS_FIELDS if model_overrides[k] is not None}
    cfg = dataclasses.replace(cfg, **numerics)
    if cfg.vocab_size < vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)  # grown in load_params below
    return cfg


def load_params(source: InitSource, model_cfg, like) -> dict:
    """The source's trunk (every part but the scalar heads), placed in the shardings of `like`.

    `like` is the model's parameter tree, abstract (ShapeDtypeStructs with shardings) or
    real; `train.state.init_state(..., params=trunk)` initializes the heads.
    """
    if source.kind == "workdir":
        return restore_trunk(source.path, like, source.step)
    from model import hf

    # Host arrays, the same on every process: device_put may spread them over processes.
    hf_cfg, loaded = hf.load_llama(source.path, scan_layers=model_cfg.scan_layers)
    if hf_cfg.vocab_size < model_cfg.vocab_size:
        _, loaded = hf.resize_embeddings(hf_cfg, loaded, model_cfg.vocab_size)
    trunk = {k: v for k, v in loaded.items() if k not in HEAD_KEYS}
    _check_trunk(source.path, trunk, like)
    return {
        key: jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), subtree, like[key])
        for key, subtree in trunk.items()
        if key in like
    }


def restore_trunk(workdir: str, like, step: int | None = None) -> dict:
    """A run's parameters at `step` (default: newest) without scalar heads, restored into the
    shardings of `like`.

    Orbax reads each shard straight onto its devices, so this works on any mesh and with
    several processes (a device_put of arrays held by one process could not).
    """
    metadata, step = checkpoint.params_metadata(workdir, step)
    _check_trunk(workdir, {k: v for k, v in metadata.items() if k not in HEAD_KEYS}, like)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(key, subtree):
        if key in like and key not in HEAD_KEYS:
            return jax.tree.map(
                lambda m, t: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=t.sharding),
                subtree,
                like[key],
            )
        # Saved parts this model does not use (another objective's head): read, then dropped.
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), subtree
        )

    restored, _ = checkpoint.load_params(
        workdir, {key: abstract(key, subtree) for key, subtree in metadata.items()}, step
    )
    return {key: value for key, value in restored.items() if key in like and key not in HEAD_KEYS}


def _check_trunk(path: str, trunk, like) -> None:
    """Raises unless `trunk` holds every non-head part of `like` in the same shapes."""
    missing = set(like) - set(trunk) - set(HEAD_KEYS)
    if missing:
        raise ValueError(f"init_from={path} lacks parameters {sorted(missing)}")
    for key in set(trunk) & set(like):
        jax.tree.map(_check_shape(key), trunk[key], like[key])


def _check_shape(key):
    def check(x, target):
        if x.shape != target.shape:
            raise ValueError(
                f"init_from: {key} has shape {x.shape}, the model wants {target.shape}"
            )

    return check
