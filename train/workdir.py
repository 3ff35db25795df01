"""A run's workdir: the resolved config, and everything inference needs to load a run.

Files (see DESIGN.md, "Public contract"): config.json, metrics.jsonl, checkpoints/,
tokenizer.model, eval.json and TensorBoard events. A workdir is a local path or a URI
(gs://bucket/run): every file goes through `etils.epath`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from data.build import is_remote
from model.config import ModelConfig, get_preset

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"


def absolute(path: epath.PathLike) -> epath.Path:
    """`path` made absolute when local; a URI such as gs://bucket/run is already absolute."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def resolve_model_config(model: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """ModelConfig from `config.model`: its preset, then every other field as an override."""
    fields = {k: v for k, v in model.to_dict().items() if k != "preset" and v is not None}
    fields.setdefault("vocab_size", vocab_size)
    return get_preset(model.preset, **fields)


def resolved_config(config: ml_collections.ConfigDict, model_cfg: ModelConfig):
    """A copy of `config` whose `model` lists every ModelConfig field actually used."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.model = {"preset": config.model.preset, **dataclasses.asdict(model_cfg)}
    return resolved


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json (process 0 only)."""
    if jax.process_index() == 0:
        epath.Path(workdir, CONFIG_FILE).write_text(
            config.to_json_best_effort(indent=2, sort_keys=True)
        )


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into `workdir`."""
    path = epath.Path(workdir, CONFIG_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a train.main workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def model_config_of(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig recorded in a resolved config."""
    return ModelConfig(**{k: v for k, v in config.model.to_dict().items() if k != "preset"})


def copy_tokenizer(src_workdir: str, dst_workdir: str) -> None:
    """Copies tokenizer.model between workdirs (later stages reuse the SFT tokenizer)."""
    src = epath.Path(src_workdir, TOKENIZER_FILE)
    if not src.exists():
        raise FileNotFoundError(f"{src} not found")
    if jax.process_index() == 0:
        epath.Path(dst_workdir, TOKENIZER_FILE).write_bytes(src.read_bytes())


@dataclasses.dataclass
class LoadedRun:
    """A trained run ready for sampling or evaluation."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    params: Any
    tokenizer: Any
    step: int


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
    """Loads config, tokenizer and the newest (or given) checkpoint's parameters."""
    from data.tokenizer import Tokenizer
    from train.checkpoint import load_params

    config = read_config(workdir)
    tokenizer = Tokenizer.from_proto(epath.Path(workdir, TOKENIZER_FILE).read_bytes())
    params, step = load_params(workdir, step=step)
    return LoadedRun(config, model_config_of(config), params, tokenizer, step)
