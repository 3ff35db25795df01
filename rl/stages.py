"""The runs an RL job starts from: the SFT policy (`init_from`) and, for dense rewards, the PRM.

`ensure_stages(config, workdir)` resolves "{workdir}" in `init_from`, `rl.ref_from` and
`rl.prm.workdir` (so the defaults name siblings of the RL workdir), then trains each stage
that is missing or unfinished with its own default config through the same trainer loop,
and says so. A finished stage (its final checkpoint and eval.json written) is reused; an
interrupted one resumes. So `train.main --config=rl.py` needs no earlier command. Workdirs
may be local paths or gs:// URIs: paths are strings here and files go through `etils.epath`.
"""

from __future__ import annotations

import importlib
import os
import posixpath

import ml_collections
from etils import epath

from data.build import is_remote
from train import init_from as init_from_lib
from train import workdir as workdir_lib

PLACEHOLDER = "{workdir}"


def resolve(path: str, workdir: str) -> str:
    """`path` with "{workdir}" replaced by the absolute `workdir`, normalized ("" stays "")."""
    if not path:
        return path
    return normalize(path.replace(PLACEHOLDER, os.fspath(workdir_lib.absolute(workdir))))


def normalize(path: str) -> str:
    """`path` without "." and ".." parts; a URI keeps its scheme ("gs://bucket/a/../b")."""
    if not is_remote(path):
        return os.path.normpath(path)
    scheme, _, rest = path.partition("://")
    bucket, _, key = rest.partition("/")
    # ".." stops at the bucket: gs://bucket/.. is no place for a run.
    key = posixpath.normpath(f"/{key}").lstrip("/")
    return f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"


def is_finished(workdir: str) -> bool:
    """Whether `workdir` holds a run that reached its num_steps and wrote eval.json."""
    from train import checkpoint

    if not epath.Path(workdir, "eval.json").exists():
        return False
    try:
        num_steps = int(workdir_lib.read_config(workdir).num_steps)
    except (FileNotFoundError, AttributeError, ValueError):
        return False
    return (checkpoint.latest_step(workdir) or 0) >= num_steps


def load_stage_config(spec: str) -> ml_collections.ConfigDict:
    """The config `name.py[:variant]` of train/configs, as train.main would load it."""
    name, _, variant = spec.partition(":")
    module_name = name.removesuffix(".py")
    try:
        module = importlib.import_module(f"train.configs.{module_name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"stage config {spec!r}: no train/configs/{module_name}.py") from e
    return module.get_config(variant or None)


def run_stage(label: str, spec: str, stage_workdir: str, init_from: str | None = None) -> None:
    """Trains (or resumes) one stage with config `spec` into `stage_workdir`."""
    from train.loop import run

    config = load_stage_config(spec)
    if init_from is not None:
        config.init_from = init_from
    state = "resuming the unfinished run" if epath.Path(stage_workdir).is_dir() else "training it"
    print(
        f"RL starts from the {label} run in {stage_workdir}, which is not finished: {state} "
        f"first with --config={spec} (python -m train.main --config={spec} "
        f"--workdir={stage_workdir}).",
        flush=True,
    )
    run(config, stage_workdir)


def ensure_stages(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Resolves the stage paths of an RL config in place and trains the missing stages.

    Configs without an `rl` field are left alone, so a generic entry point may call this.
    """
    if "rl" not in config:
        return
    rl = config.rl
    config.init_from = resolve(config.init_from, workdir)
    rl.ref_from = resolve(rl.ref_from, workdir)
    sft = config.init_from
    if not sft:
        return  # a policy trained from scratch: nothing to build
    if not init_from_lib.is_huggingface_dir(sft):
        if is_finished(sft):
            print(f"Reusing the finished SFT run in {sft}.", flush=True)
        else:
            run_stage("SFT", rl.sft_stage, sft)
    rl.prm.workdir = resolve(rl.prm.workdir, workdir)
    if rl.rewards.get("prm", 0.0):
        if is_finished(rl.prm.workdir):
            print(f"Reusing the finished PRM run in {rl.prm.workdir}.", flush=True)
        else:
            run_stage("PRM", rl.prm.stage, rl.prm.workdir, init_from=sft)
