"""Reward models on samples of the SFT policy: outcome (ORM) or process (PRM).

    python -m train.main --config=rm.py:kind=orm --workdir=workdirs/orm
    python -m train.main --config=rm.py:kind=prm --workdir=workdirs/prm
    python -m train.main --config=rm.py:kind=prm,tiny --workdir=/tmp/prm \\
        --config.init_from=/tmp/sft_tiny                                  # seconds, for tests

The run starts from the SFT checkpoint in `init_from` (default: workdirs/sft) and adds a
reward head. Before the first step it samples and labels its training data from that same
checkpoint (rl.rm_data; cached in the workdir), so one command does everything given an
SFT workdir. The defaults take about 10 minutes on a 2-core CPU, data included.
"""

from __future__ import annotations

import ml_collections

from train.configs import sft
from train.configs.common import base_config, parse_arg

KINDS = ("orm", "prm")


def get_config(arg: str | None = None):
    """Returns the reward-model config; variants: `kind=orm|prm`, `tiny`."""
    arg = parse_arg(arg, kind="orm", tiny=False)
    if arg.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {arg.kind!r}")

    c = base_config()
    c.objective = arg.kind
    c.init_from = "workdirs/sft"  # the SFT run: initial weights, tokenizer and sampling policy
    # The SFT run's problems, so its held-out splits stay held out; more corrupted traces,
    # which come after the other splits and so leave them unchanged.
    c.data = sft.get_config("tiny" if arg.tiny else None).data
    c.data.corrupted_size = 3200  # ~40 for corrupted_validation at the SFT split sizes
    c.data.seq_len = 448  # a prompt plus max_new_tokens fits; rows are packed

    c.rm_data = ml_collections.ConfigDict(
        {
            "num_problems": 64,  # first train problems sampled
            "samples_per_problem": 4,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "max_new_tokens": 320,  # per sample, and per Monte-Carlo completion
            "label_source": "exact",  # exact | mc | both (rl.rm_data)
            "mc_rollouts": 4,  # completions per step for mc/both
            "corrupted_share": 0.25,  # corrupted traces per policy sample (each + its clean)
            "eval_problems": 32,  # first validation problems, sampled the same way
            "batch_size": 32,  # prompts per sampler call
            "seed": 0,
            "soft_targets": False,  # PRM on MC success rates instead of hard labels
        }
    )

    c.num_steps = 60
    c.batch_size = 16  # packed rows of data.seq_len tokens, ~2 responses each
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.log_every = 10
    c.checkpoint_every = 30
    # The "reward" evaluation scores the held-out RM data (rm_data.eval_problems); of the
    # eval fields it reads only batch_size.
    c.eval.batch_size = 32  # responses per reward-model call

    if arg.tiny:
        c.init_from = ""  # give the tiny SFT workdir: --config.init_from=DIR
        c.data.corrupted_size = 16
        c.data.seq_len = 384  # written traces run to ~370 tokens
        c.rm_data.num_problems = 4
        c.rm_data.samples_per_problem = 2
        c.rm_data.max_new_tokens = 16
        c.rm_data.mc_rollouts = 2
        c.rm_data.corrupted_share = 1.0
        c.rm_data.eval_problems = 4
        c.rm_data.batch_size = 4
        c.num_steps = 2
        c.batch_size = 8
        c.optimizer.warmup_steps = 1
        c.log_every = 1
        c.checkpoint_every = 2
        c.eval.batch_size = 8
        c.progress_bar = False
    return c
