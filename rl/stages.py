"""The runs an RL job starts from: the SFT policy (`init_from`) and, for dense rewards, the PRM.

`ensure_stages(config, workdir)` resolves "{workdir}" in `init_from`, `rl.ref_from` and
`rl.prm.workdir` (so the defaults name siblings of the RL workdir), then trains each stage
that is missing or unfinished with its own default config through the same trainer loop,
and says so. A finished stage (its final checkpoint and eval.json written) is reused; an
interrupted one resumes. So `train.main --config=rl.py` needs no earlier command.
"""

from __future__ import annotations

import glob
import importlib
import os

import ml_collections

PLACEHOLDER = "{workdir}"


def resolve(path: str, workdir: str) -> str:
    """`path` with "{workdir}" replaced by the absolute `workdir`, normalized ("" stays "")."""
    if not path:
        return path
    return os.path.normpath(path.replace(PLACEHOLDER, os.path.abspath(workdir)))


def is_huggingface_dir(path: str) -> bool:
    """A Hugging Face checkpoint directory (config.json + *.safetensors), never trained here."""
    return os.path.isfile(os.path.join(path, "config.json")) and bool(
        glob.glob(os.path.join(path, "*.safetensors"))
    )


def is_finished(workdir: str) -> bool:
    """Whether `workdir` holds a run that reached its num_steps and wrote eval.json."""
    from train import checkpoint
    from train.workdir import read_config

    if not os.path.isfile(os.path.join(workdir, "eval.json")):
        return False
    try:
        num_steps = int(read_config(workdir).num_steps)
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
    state = "resuming the unfinished run" if os.path.isdir(stage_workdir) else "training it"
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
    if not is_huggingface_dir(sft):
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
