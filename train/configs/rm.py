"""Reward models on samples of the SFT policy: outcome (ORM) or process (PRM).

    python -m train.main --config=rm.py:kind=orm --workdir=workdirs/orm
    python -m train.main --config=rm.py:kind=prm --workdir=workdirs/prm
    python -m train.main --config=rm.py:kind=prm,task=letter_count \\
        --workdir=workdirs/prm_letter_count                               # rl.py's PRM
    python -m train.main --config=rm.py:kind=prm,tiny --workdir=/tmp/prm \\
        --config.init_from=/tmp/sft_tiny                                  # seconds, for tests

The run starts from the SFT run in `init_from` (default: workdirs/sft, its newest checkpoint)
and adds a reward head. Before the first step it samples and labels its training data from
that run's checkpoint `rm_data.policy_step` (rl.rm_data; cached in the workdir), so one
command does everything given an SFT workdir. The PRM takes ~13 minutes on a 2-core CPU,
data included (an estimate: 11.8 alone without sampling; README).

`task` picks what the reward models learn:

  multiplication (default)  the search experiment's task (rl.search_eval): 3-digit x 2-digit
      products, held out, sampled from the under-trained step-700 checkpoint of the SFT run
      (sft.RM_POLICY_STEP, kept by sft.py). The reward models learn from its samples at
      temperature 1 (right 32% of the time: many wrong steps to learn from); the search
      samples it at 0.7, where it is right 60% of the time, some sample of 64 is right on
      88% of the problems and voting stalls at 72% (the final policy's voting: 95%).
      A wrong partial product or carry almost always makes the product wrong, so a trace's
      steps and its answer stand or fall together, as on MATH in "Let's Verify Step by Step".
      The reward models start from the final checkpoint, the better judge of arithmetic, and
      their head reads its language model's surprise (below).
  letter_count  RL's task and difficulty (rl.KNOBS), for RL's dense PRM reward (rl.py's
      prm.stage), sampled from the final policy, with a linear head on a trained trunk (how
      RL's PRM reward was measured). Here a sampled misspelling of a letter other than the
      asked one leaves the count right, so many right answers hold a wrong step, and a PRM
      ranks answers worse than an ORM (README).

Every step of both tasks is checkable, so exact step labels are exact.

The surprise head (model.transformer.RewardHead; session 16, README): a linear PRM head on
the trained trunk stayed near chance on wrong digits (best-of-64 11%, below the 75% of
voting), because a 3-layer trunk cannot redo a step's arithmetic at its end, while the SFT
model's own next-token surprise at the digits written ranks samples well. The head adds
`-s * max surprise over the last reward_surprise_window response tokens` to its linear
logit, and only the head trains: fine-tuning the trunk (lr 1e-3) made a sharper step
classifier (AUC 0.99) but a blunter language model, and best-of-64 fell from 83% to 78%.
The PRM's window holds a step, read at each step's end; the ORM's holds the whole response,
read at its end. Both see every token, so they differ only in their labels (session 17: an
ORM whose window held the last 32 tokens only, blind to most steps, fell to 8% at N=64).
"""

from __future__ import annotations

import ml_collections

from data.config import default_data_config
from train.configs import rl, sft
from train.configs.common import base_config, parse_arg

KINDS = ("orm", "prm")
# task -> its knobs, the longest response it needs, packed row length (~2-4 responses), the
# SFT checkpoint that samples (0: the newest) and the head's surprise window (0: linear head).
TASKS = {
    "multiplication": {
        "knobs": {},
        "max_new_tokens": 320,
        "seq_len": 576,
        "policy_step": sft.RM_POLICY_STEP,
        "surprise_window": 32,  # a step is at most ~20 tokens: the window holds all of it
    },
    "letter_count": {
        "knobs": rl.KNOBS,
        "max_new_tokens": 160,
        "seq_len": 448,
        "policy_step": 0,
        "surprise_window": 0,
    },
}
HEAD_ONLY = "^(?!reward_head)"  # optimizer.freeze: every parameter but the reward head's


def get_config(arg: str | None = None):
    """Returns the reward-model config; variants: `kind=orm|prm`, `task=...`, `tiny`."""
    arg = parse_arg(arg, kind="orm", task="multiplication", tiny=False)
    if arg.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {arg.kind!r}")
    if arg.task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {arg.task!r}")
    task = TASKS[arg.task]

    c = base_config()
    c.objective = arg.kind
    c.init_from = "workdirs/sft"  # the SFT run: initial weights, tokenizer and sampling policy
    c.model.reward_surprise_window = task["surprise_window"]
    if arg.kind == "orm" and task["surprise_window"]:
        # The ORM judges a response once, at its last token, so its window is the whole
        # record (only the response's surprise counts): it reads every step the PRM reads.
        c.model.reward_surprise_window = task["seq_len"]
    # One task (above). Its test split is rl.search_eval's held-out problems: rl.search_eval
    # drops any whose prompt is in the SFT run's train split (words belong to a split by a
    # hash of their spelling anyway).
    c.data = default_data_config()
    c.data.tasks = {arg.task: {"weight": 1.0, "knobs": task["knobs"]}}
    c.data.train_size = 2000
    c.data.validation_size = 64
    c.data.test_size = 64
    c.data.corrupted_size = 1000  # corrupted_validation gets as many per problem: 32
    c.data.seq_len = task["seq_len"]  # rows are packed

    c.rm_data = ml_collections.ConfigDict(
        {
            "num_problems": 512,  # first train problems sampled
            "samples_per_problem": 4,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "max_new_tokens": task["max_new_tokens"],  # per sample and per MC completion
            "label_source": "exact",  # exact | mc | both (rl.rm_data)
            "mc_rollouts": 4,  # completions per step for mc/both
            "corrupted_share": 0.25,  # corrupted traces per policy sample (each + its clean)
            "eval_problems": 64,  # first validation problems, sampled the same way
            "batch_size": 32,  # prompts per sampler call
            "seed": 0,
            # init_from's checkpoint that samples (0: the one the model starts from)
            "policy_step": task["policy_step"],
            "soft_targets": False,  # PRM on MC success rates instead of hard labels
        }
    )

    # Weight of a wrong label in the BCE (train.objectives.reward.marked_bce); 1 is plain BCE.
    c.loss = {"negative_weight": 1.0}

    # ~3 passes over the 3072 train records; 60 steps left the PRM at step AUC 0.68 (240: 0.73).
    c.num_steps = 240
    c.batch_size = 16  # packed rows of data.seq_len tokens
    c.optimizer.lr = 1e-3
    if c.model.reward_surprise_window:
        # Only the head trains (docstring). At lr 1e-3 its bias and surprise scale barely
        # moved in 240 steps (bias 0.12 where 92% of the labels are 1) and the linear term
        # did the work: best-of-64 80%; at 1e-2, 83%.
        c.optimizer.freeze = HEAD_ONLY
        c.optimizer.lr = 1e-2
        if arg.kind == "prm":
            # Still learning at 240: at 480, best-of-64 82.8% -> 85.9% and first-error
            # localization 73.8% -> 81.9% (README). The ORM was measured at 240 only.
            c.num_steps = 480
    c.optimizer.warmup_steps = 10
    c.log_every = 20
    c.checkpoint_every = 120
    # The "reward" evaluation scores the held-out RM data (rm_data.eval_problems); of the
    # eval fields it reads only batch_size.
    c.eval.batch_size = 32  # responses per reward-model call

    if arg.tiny:
        c.init_from = ""  # give the tiny SFT workdir: --config.init_from=DIR
        c.data = sft.get_config("tiny").data  # the tiny SFT run's own problems
        c.data.corrupted_size = 16
        c.data.seq_len = 384  # written traces run to ~370 tokens
        c.rm_data.num_problems = 4
        c.rm_data.samples_per_problem = 2
        c.rm_data.max_new_tokens = 16
        c.rm_data.mc_rollouts = 2
        c.rm_data.corrupted_share = 1.0
        c.rm_data.eval_problems = 4
        c.rm_data.batch_size = 4
        c.rm_data.policy_step = 0  # the tiny run keeps its last two checkpoints only
        c.num_steps = 2
        c.batch_size = 8
        c.optimizer.warmup_steps = 1
        c.log_every = 1
        c.checkpoint_every = 2
        c.eval.batch_size = 8
        c.progress_bar = False
    return c
