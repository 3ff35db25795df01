"""Hugging Face Llama-architecture checkpoints: load them into params, save params as them.

The layout is the one `transformers` writes for `LlamaForCausalLM` (Mistral and bias-free Qwen2
share it): `config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`. No PyTorch: tensors go through `safetensors` in NumPy, and
`ml_dtypes` gives NumPy its bfloat16.

HF `nn.Linear` weights are stored [out, in], so every kernel is a transpose plus a reshape:

    q_proj.weight [H*Dh, D]  <->  attn.q.kernel [D, H, Dh]   (k_proj, v_proj alike, with K)
    o_proj.weight [D, H*Dh]  <->  attn.o.kernel [H, Dh, D]
    gate_proj, up_proj [F, D] <-> kernel [D, F];  down_proj [D, F] <-> kernel [F, D]
    lm_head.weight [V, D]    <->  lm_head.kernel [D, V]

q and k need no permutation because the model's RoPE pairs dims (i, i + Dh/2), like HF's
`rotate_half`.

Deliberate limits:
  - Sliding-window attention (Mistral, Qwen2) is ignored with a warning: the model always uses
    full causal attention, which matches HF only for sequences no longer than the window.
  - Attention and MLP biases must be absent or all zero (Qwen2 checkpoints have nonzero q/k/v
    biases, so they are rejected).
  - `save_llama` writes only the language model: scalar heads (value, reward) and any other
    extra top-level params are skipped, with a log line.
"""

import contextlib
import dataclasses
import json
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from model.config import ModelConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

Params = dict[str, Any]


# ----------------------------------------------------------------------------- config.json


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF `config.json`; `overrides` replace any field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json has model_type={model_type!r}; only {SUPPORTED_MODEL_TYPES} "
            "(the Llama architecture) can be loaded"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act={hf['hidden_act']!r}; only 'silu' works")
    missing = [key for key in _REQUIRED_KEYS if hf.get(key) is None]
    if missing:
        raise ValueError(f"config.json lacks required keys {missing}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json sets partial_rotary_factor; only full-width RoPE works")
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True):
        warnings.warn(
            f"config.json sets sliding_window={window}; it is ignored and attention is full "
            "causal, which matches the original model only on sequences up to that length",
            stacklevel=2,
        )
    num_heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = _rope_from_hf(hf)
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except TypeError as err:
        raise TypeError(f"bad ModelConfig override in {sorted(overrides)}: {err}") from err


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
    """Reads (rope_theta, rope_scaling) from transformers 5.x or older config layouts."""
    # 5.x nests everything in rope_parameters; older files keep rope_theta at the top level.
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"config.json uses rope_type={rope_type!r}; only default and llama3 work")
    return theta, (
        "llama3",
        float(rope["factor"]),
        float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        int(rope["original_max_position_embeddings"]),
    )


def config_to_hf(cfg: ModelConfig, **token_ids: int | list[int] | None) -> dict[str, Any]:
    """The `config.json` dict transformers would write for this model as LlamaForCausalLM."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        kind, factor, low, high, original = cfg.rope_scaling
        rope_scaling = {
            "rope_type": kind,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    hf.update({name: value for name, value in token_ids.items() if value is not None})
    return hf


# ------------------------------------------------------------------------ tensor name table


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor, its place in the params tree, and both shapes."""

    hf_name: str  # per-layer names hold "{i}"
    path: tuple[str, ...]  # inside the params tree, or inside one layer's subtree
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def transposed(self) -> bool:
        """Kernels are nn.Linear weights: [out, in] in HF, [in, ...out] here."""
        return self.path[-1] == "kernel"

    def from_hf(self, w: np.ndarray) -> np.ndarray:
        """HF layout to params layout (a view where possible)."""
        return w.T.reshape(self.shape) if self.transposed else w

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Params layout to a contiguous HF tensor."""
        x = x.reshape(self.hf_shape[::-1]).T if self.transposed else x
        return np.ascontiguousarray(x)


def _global_tensors(cfg: ModelConfig) -> list[_Tensor]:
    """Tensors outside the layer stack."""
    V, D = cfg.vocab_size, cfg.d_model
    tensors = [
        _Tensor("model.embed_tokens.weight", ("embed", "embedding"), (V, D), (V, D)),
        _Tensor("model.norm.weight", ("final_norm", "scale"), (D,), (D,)),
    ]
    if not cfg.tie_embeddings:
        tensors.append(_Tensor("lm_head.weight", ("lm_head", "kernel"), (V, D), (D, V)))
    return tensors


def _layer_tensors(cfg: ModelConfig) -> list[_Tensor]:
    """Tensors of one decoder layer; hf_name holds "{i}" for the layer index."""
    D, H, K, Dh, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    table = [
        ("input_layernorm", ("attn_norm", "scale"), (D,), (D,)),
        ("self_attn.q_proj", ("attn", "q", "kernel"), (H * Dh, D), (D, H, Dh)),
        ("self_attn.k_proj", ("attn", "k", "kernel"), (K * Dh, D), (D, K, Dh)),
        ("self_attn.v_proj", ("attn", "v", "kernel"), (K * Dh, D), (D, K, Dh)),
        ("self_attn.o_proj", ("attn", "o", "kernel"), (D, H * Dh), (H, Dh, D)),
        ("post_attention_layernorm", ("mlp_norm", "scale"), (D,), (D,)),
        ("mlp.gate_proj", ("mlp", "gate", "kernel"), (F, D), (D, F)),
        ("mlp.up_proj", ("mlp", "up", "kernel"), (F, D), (D, F)),
        ("mlp.down_proj", ("mlp", "down", "kernel"), (D, F), (F, D)),
    ]
    return [
        _Tensor(f"model.layers.{{i}}.{name}.weight", path, hf_shape, shape)
        for name, path, hf_shape, shape in table
    ]


def _expected_names(cfg: ModelConfig) -> set[str]:
    """Every HF tensor name the config calls for."""
    names = {t.hf_name for t in _global_tensors(cfg)}
    for i in range(cfg.num_layers):
        names.update(t.hf_name.format(i=i) for t in _layer_tensors(cfg))
    return names


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating inner dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------- loading


def load_llama(
    path: str | Path, *, dtype: str = "float32", scan_layers: bool = True, **config_overrides: Any
) -> tuple[ModelConfig, Params]:
    """Reads an HF Llama-architecture checkpoint dir into (config, host NumPy params).

    `dtype` is both the params' dtype and the compute dtype; `config_overrides` replace any
    other ModelConfig field (e.g. `max_seq_len`, `remat`). Place the returned NumPy arrays with
    `jax.device_put(params, shardings)`.
    """
    path = Path(path)
    fields = {"dtype": dtype, "param_dtype": dtype, "scan_layers": scan_layers}
    cfg = config_from_hf(_read_config(path), **{**fields, **config_overrides})
    np_dtype = _np_dtype(cfg.param_dtype)
    weight_map = _weight_map(path)
    with contextlib.ExitStack() as stack:
        read = _tensor_reader(weight_map, stack)
        _check_extra_tensors(cfg, weight_map, read)
        params: Params = {}
        for t in _global_tensors(cfg):
            _set(params, t.path, np.asarray(t.from_hf(read(t.hf_name, t.hf_shape)), np_dtype))
        params.update(_load_layers(cfg, read, np_dtype))
    return cfg, params


def _read_config(path: Path) -> dict[str, Any]:
    """Parses `config.json`, failing clearly when the directory or file is missing."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; an HF checkpoint needs config.json")
    return json.loads(config_file.read_text())


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or by scanning files."""
    index_file = path / INDEX_NAME
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_file} has no 'weight_map' object")
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index_file} lists {file.name}, which is missing")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path} has no {SINGLE_FILE_NAME} and no {INDEX_NAME}")
    files = {}
    for shard in shards:
        with safe_open(shard, framework="np") as f:
            files.update({name: shard for name in f.keys()})
    return files


def _tensor_reader(
    weight_map: Mapping[str, Path], stack: contextlib.ExitStack
) -> Callable[..., np.ndarray]:
    """A function reading one named tensor, checking its shape if given; shards open once."""
    handles = {}

    def read(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        file = weight_map.get(name)
        if file is None:
            raise ValueError(f"checkpoint lacks tensor {name} (expected shape {list(shape)})")
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(file, framework="np"))
        found = tuple(handles[file].get_slice(name).get_shape())
        if shape is not None and found != tuple(shape):
            raise ValueError(
                f"tensor {name} in {file.name} has shape {list(found)}, but config.json "
                f"implies {list(shape)}"
            )
        return handles[file].get_tensor(name)

    return read


def _check_extra_tensors(
    cfg: ModelConfig, weight_map: Mapping[str, Path], read: Callable[..., np.ndarray]
) -> None:
    """Tolerates harmless extra tensors and rejects any that would change the model."""
    unexpected = []
    for name in sorted(set(weight_map) - _expected_names(cfg)):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints store the RoPE table; it is recomputed
        if name == "lm_head.weight" and cfg.tie_embeddings:
            log.info("tied checkpoint also stores lm_head.weight; using embed_tokens instead")
        elif name.endswith(".bias"):
            if np.any(np.asarray(read(name), np.float32) != 0):
                raise ValueError(
                    f"checkpoint has nonzero bias {name}; attention and MLP biases (as in "
                    "Qwen2, or attention_bias/mlp_bias true) are not supported"
                )
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensors a plain Llama does not use, e.g. "
            f"{unexpected[:5]}; is config.json's model_type right?"
        )


def _load_layers(cfg: ModelConfig, read: Callable[..., np.ndarray], np_dtype: np.dtype) -> Params:
    """Reads the decoder layers one at a time into stacked ("layers") or per-layer subtrees."""
    tensors = _layer_tensors(cfg)
    if not cfg.scan_layers:
        layers = {}
        for i in range(cfg.num_layers):
            layer: Params = {}
            for t in tensors:
                w = read(t.hf_name.format(i=i), t.hf_shape)
                _set(layer, t.path, np.asarray(t.from_hf(w), np_dtype))
            layers[f"layers_{i}"] = layer
        return layers
    # Fill preallocated stacks so no shard or layer is held twice in memory.
    stacked = {t.path: np.empty((cfg.num_layers, *t.shape), np_dtype) for t in tensors}
    for i in range(cfg.num_layers):
        for t in tensors:
            stacked[t.path][i] = t.from_hf(read(t.hf_name.format(i=i), t.hf_shape))
    layers: Params = {}
    for tensor_path, array in stacked.items():
        _set(layers, tensor_path, array)
    return {"layers": layers}


def _np_dtype(name: str) -> np.dtype:
    """NumPy dtype for a config dtype string."""
    if name not in _NP_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_NP_DTYPES)}")
    return np.dtype(_NP_DTYPES[name])


# ----------------------------------------------------------------------------------- saving


def save_llama(
    cfg: ModelConfig,
    params: Params,
    path: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Writes params as an HF LlamaForCausalLM checkpoint (float32 safetensors + config.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _log_skipped_params(cfg, params)
    entries = _hf_entries(cfg, params)
    sizes = [4 * int(np.prod(t.hf_shape)) for t, _, _ in entries]  # float32 bytes
    shards = _plan_shards(sizes, max_shard_bytes)
    _remove_stale_checkpoint(path)
    weight_map = {}
    for n, shard in enumerate(shards):
        name = SINGLE_FILE_NAME if len(shards) == 1 else _shard_name(n, len(shards))
        # One shard is materialized at a time, to bound host memory.
        tensors = {}
        for t, array, layer in (entries[k] for k in shard):
            x = array if layer is None else array[layer]
            tensors[t.hf_name] = t.to_hf(np.asarray(jax.device_get(x), np.float32))
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update({tensor_name: name for tensor_name in tensors})
    if len(shards) > 1:
        weight_map = dict(sorted(weight_map.items()))
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    hf_config = config_to_hf(
        cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    (path / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")


def _hf_entries(cfg: ModelConfig, params: Params) -> list[tuple[_Tensor, Any, int | None]]:
    """(tensor with its concrete HF name, params array, layer index into a stack or None)."""
    entries = [(t, _checked(params, t.path, t.shape), None) for t in _global_tensors(cfg)]
    for i in range(cfg.num_layers):
        for t in _layer_tensors(cfg):
            named = dataclasses.replace(t, hf_name=t.hf_name.format(i=i))
            if "layers" in params:
                stack = _checked(params, ("layers", *t.path), (cfg.num_layers, *t.shape))
                entries.append((named, stack, i))
            else:
                entries.append((named, _checked(params, (f"layers_{i}", *t.path), t.shape), None))
    return entries


def _checked(params: Params, path: tuple[str, ...], shape: tuple[int, ...]) -> Any:
    """The array at `path`, after checking it exists and has the shape the config implies."""
    tree = params
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise ValueError(f"params lack {'/'.join(path)}, which the config calls for")
        tree = tree[key]
    if tuple(tree.shape) != shape:
        raise ValueError(
            f"params {'/'.join(path)} has shape {list(tree.shape)}; the config implies "
            f"{list(shape)}"
        )
    return tree


def _log_skipped_params(cfg: ModelConfig, params: Params) -> None:
    """Logs top-level params (scalar heads and the like) that an HF checkpoint cannot hold."""
    known = {"embed", "layers", "final_norm", "lm_head"}
    known.update(f"layers_{i}" for i in range(cfg.num_layers))
    for name in sorted(set(params) - known):
        log.info("save_llama: skipping params[%r]; LlamaForCausalLM has no such weights", name)


def _plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy split of tensor indices into shards of at most max_bytes (a bigger tensor alone)."""
    shards: list[list[int]] = [[]]
    used = 0
    for k, size in enumerate(sizes):
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += size
    return shards


def _shard_name(n: int, count: int) -> str:
    """The transformers shard file name, 1-based."""
    return f"model-{n + 1:05d}-of-{count:05d}.safetensors"


def _remove_stale_checkpoint(path: Path) -> None:
    """Deletes weight files a previous save left, so the index never mixes two checkpoints."""
    for file in path.iterdir():
        if file.name in (SINGLE_FILE_NAME, INDEX_NAME) or _SHARD_PATTERN.fullmatch(file.name):
            log.info("save_llama: replacing %s", file)
            file.unlink()


# --------------------------------------------------------------------------------- resizing


def resize_embeddings(
    cfg: ModelConfig, params: Params, new_vocab_size: int
) -> tuple[ModelConfig, Params]:
    """Grows the vocabulary; new embedding rows and lm_head columns are the mean of old ones."""
    extra = new_vocab_size - cfg.vocab_size
    if extra < 0:
        raise ValueError(
            f"resize_embeddings cannot shrink the vocabulary from {cfg.vocab_size} to "
            f"{new_vocab_size}; token ids above the new size would be lost"
        )
    params = dict(params)
    embedding_VxD = _append_mean(params["embed"]["embedding"], extra, axis=0)
    params["embed"] = {**params["embed"], "embedding": embedding_VxD}
    if not cfg.tie_embeddings:
        kernel_DxV = _append_mean(params["lm_head"]["kernel"], extra, axis=1)
        params["lm_head"] = {**params["lm_head"], "kernel": kernel_DxV}
    return dataclasses.replace(cfg, vocab_size=new_vocab_size), params


def _append_mean(x: Any, extra: int, axis: int) -> Any:
    """Appends `extra` copies of the mean along `axis`; NumPy stays NumPy (host memory)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    mean = xp.mean(xp.asarray(x, np.float32), axis=axis, keepdims=True).astype(x.dtype)
    reps = [1] * x.ndim
    reps[axis] = extra
    return xp.concatenate([x, xp.tile(mean, reps)], axis=axis)
