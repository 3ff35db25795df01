"""Accuracy vs samples per problem: best-of-N, voting and PRM beam search on held-out problems.

    python -m rl.search_eval --policy=workdirs/sft --orm=workdirs/orm --prm=workdirs/prm
    python -m rl.search_eval --policy=workdirs/sft --orm=workdirs/orm --prm=workdirs/prm \\
        --tasks=multiplication --knobs='{"multiplication": {"digits_a": 4}}' --beam_widths=2,4

Samples `max_n` candidates per problem once, scores them with the ORM and the PRM, and draws
the accuracy of every selection method (rl.rerank) at N = 1, 2, 4, ..., max_n from random
subsets of that pool, with the oracle pass@N above them. With `--format_check` (on), every
method, voting included, chooses among a problem's well-formed candidates if it has any.
Beam search (rl.search_beam), at each of `--beam_widths`, is placed at its equivalent N: the
tokens it sampled per problem divided by the mean length of one sample. Writes
`search_eval.json` and `search_eval.png` into --out (default: the policy workdir) and prints
a table.

Reranking needs room: the policy's pass@1 should be well inside (0, 1), ideally 30-70%. Pick
the difficulty with `--tasks`/`--knobs` (fresh test-split problems, prompts seen in training
dropped), or an under-trained checkpoint with `--policy_step`.

Samples are drawn at temperature 0.7 by default. At 1, the default policy's wrong answers
scatter (28 distinct answers in 64 samples of a problem; the most common wrong one holds
12% of them), so wherever a right answer turns up it soon leads the vote, voting climbs
nearly as fast as the oracle, and no reranker can pull away from it as N grows. At 0.7 a
problem's errors repeat (7 distinct answers, the top wrong one 22%), as a model's mistakes
do on MATH: voting stalls while some sample is still right, which is the room a verifier is
for (README, reward models).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from data.builder import canonical_prompt, load_split, record_to_problem
from data.tasks import generate_problems
from data.tasks.base import Problem
from rl import rerank
from rl.search_beam import BeamConfig, prm_scorer, search_questions

RESULT_FILE = "search_eval.json"
PLOT_FILE = "search_eval.png"
PASS_AT_1_RANGE = (0.3, 0.7)

# ----------------------------------------------------------------------------- problems


def parse_knobs(text: str) -> dict[str, dict[str, Any]]:
    """--knobs as {task: {knob: value}}; a clear error for anything else."""
    if not text:
        return {}
    try:
        knobs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--knobs is not valid JSON ({e}): {text!r}") from e
    if not isinstance(knobs, dict) or not all(isinstance(v, dict) for v in knobs.values()):
        raise ValueError(
            f'--knobs must map task names to knob dicts, e.g. {{"addition": '
            f'{{"digits": 5}}}}; got {text!r}'
        )
    return knobs


def fresh_problems(
    tasks: list[str], knobs: dict, num: int, seed: int, split: str, seen: set[str]
) -> list[Problem]:
    """`num` generated problems of `tasks` (or the knobs' tasks) whose prompts are not in `seen`."""
    names = list(tasks) or sorted(knobs)
    unknown = sorted(set(knobs) - set(names))
    if unknown:
        raise ValueError(f"--knobs names tasks {unknown} that are not in --tasks={names}")
    mix = {name: {"weight": 1.0, "knobs": knobs.get(name, {})} for name in names}
    drawn = generate_problems(mix, 2 * num + 8, seed, split)  # room for dropped duplicates
    unseen = [p for p in drawn if canonical_prompt(p.prompt) not in seen]
    if len(unseen) < num:
        logging.warning("only %d unseen problems of %d asked", len(unseen), num)
    return unseen[:num]


def load_problems(
    policy_workdir: str, config, *, split, num, tasks, knobs, seed, data_from=None
) -> list[Problem]:
    """Held-out problems the policy never trained on: fresh ones of `tasks`/`knobs`, or else
    the `split` of the data of `data_from` (a (workdir, config) pair; default the policy's)."""
    from data.build import prepare

    prepared = prepare(config.data, policy_workdir, verbose=False)
    train = load_split(prepared.builder, "train")
    seen = {canonical_prompt(train[i]["prompt"]) for i in range(len(train))}
    if tasks or knobs:
        return fresh_problems(tasks, knobs, num, seed, split, seen)
    builder = prepared.builder
    if data_from is not None:
        workdir, other = data_from
        builder = prepare(other.data, workdir, verbose=False).builder
    source = load_split(builder, split)
    problems = [record_to_problem(source[i]) for i in range(len(source))]
    unseen = [p for p in problems if canonical_prompt(p.prompt) not in seen]
    if len(unseen) < len(problems):
        logging.warning(
            "dropped %d problems of the policy's train split", len(problems) - len(unseen)
        )
    return unseen[:num]


# ----------------------------------------------------------------------------- the experiment


def n_values(max_n: int) -> list[int]:
    """1, 2, 4, ... up to max_n (max_n included even when not a power of two)."""
    if max_n < 1:
        raise ValueError(f"--max_n must be >= 1, got {max_n}")
    values = [1 << k for k in range(max_n.bit_length()) if 1 << k <= max_n]
    return values if values[-1] == max_n else values + [max_n]


def run_beams(
    run, prm, problems, configs: list[BeamConfig], *, batch_size, seed, mean_sample_tokens
) -> list[dict]:
    """Beam search with each config: accuracy, tokens per problem and its equivalent N."""
    rows = []
    scorer = prm_scorer(prm.params, prm.model_cfg)
    for config in configs:
        found = search_questions(
            run.params,
            run.model_cfg,
            run.tokenizer,
            scorer,
            [p.prompt for p in problems],
            config,
            rng=jax.random.PRNGKey(seed + 1),
            batch_size=batch_size,
        )
        tokens = float(np.mean([r.tokens_used for r in found]))
        correct = [rerank.judge(p, r.text)[1] for p, r in zip(problems, found, strict=True)]
        rows.append(
            {
                "beam_width": config.beam_width,
                "num_candidates": config.num_candidates,
                "accuracy": float(np.mean(correct)),
                "finished": float(np.mean([r.finished for r in found])),
                "tokens_per_problem": tokens,
                "equivalent_n": tokens / max(mean_sample_tokens, 1.0),
            }
        )
    return rows


def experiment(
    run,
    orm,
    prm,
    problems,
    *,
    max_n: int,
    temperature: float,
    max_new: int,
    batch_size: int,
    rm_batch_size: int,
    num_draws: int,
    seed: int,
    beam_configs: list[BeamConfig] = (),
    beam_batch_size: int = 4,
    format_check: bool = True,
) -> dict:
    """Samples, scores and selects; returns the search_eval.json dict (without its config)."""
    generations = rerank.sample_candidates(
        run.params,
        run.model_cfg,
        run.tokenizer,
        problems,
        num_samples=max_n,
        temperature=temperature,
        max_new_tokens=max_new,
        batch_size=batch_size,
        rng=jax.random.PRNGKey(seed),
    )
    scores = {
        kind: None
        if rm is None
        else rerank.reward_scores(rm, problems, generations, batch_size=rm_batch_size)
        for kind, rm in (("orm", orm), ("prm", prm))
    }
    table = rerank.build_table(
        problems,
        generations,
        orm_scores=scores["orm"],
        prm_scores=scores["prm"],
        format_check=format_check,
    )
    mean_sample_tokens = float(table.lengths_PxN.mean())
    return {
        "num_problems": len(problems),
        "pool_size": max_n,
        "pass@1": float(table.correct_PxN.mean()),
        "well_formed": None
        if table.well_formed_PxN is None
        else float(np.mean(table.well_formed_PxN)),
        "per_task_pass@1": per_task_pass_at_1(problems, table),
        "mean_sample_tokens": mean_sample_tokens,
        "methods": rerank.accuracy_curves(table, n_values(max_n), num_draws=num_draws, seed=seed),
        "beam_search": run_beams(
            run,
            prm,
            problems,
            list(beam_configs),
            batch_size=beam_batch_size,
            seed=seed,
            mean_sample_tokens=mean_sample_tokens,
        ),
    }


def per_task_pass_at_1(problems: list[Problem], table: rerank.CandidateTable) -> dict:
    """Mean sample accuracy of each task."""
    tasks = sorted({p.task for p in problems})
    rows = {t: [i for i, p in enumerate(problems) if p.task == t] for t in tasks}
    return {t: float(table.correct_PxN[rows[t]].mean()) for t in tasks}


# ----------------------------------------------------------------------------- output


def format_table(result: dict) -> str:
    """Accuracy per method (rows) and N (columns), then the beam search rows."""
    methods = result["methods"]
    ns = next(iter(methods.values()))["n"]
    width = max(len(name) for name in methods) + 2
    lines = [f"{'method':<{width}}" + "".join(f"{'N=' + str(n):>8}" for n in ns)]
    for name, curve in methods.items():
        lines.append(f"{name:<{width}}" + "".join(f"{m:>8.3f}" for m in curve["mean"]))
    for row in result["beam_search"]:
        lines.append(
            f"beam W={row['beam_width']} C={row['num_candidates']}: accuracy "
            f"{row['accuracy']:.3f} at N~{row['equivalent_n']:.1f} "
            f"({row['tokens_per_problem']:.0f} tokens/problem, {row['finished']:.0%} finished)"
        )
    lines.append(
        f"{result['num_problems']} problems, pass@1 {result['pass@1']:.3f}, "
        f"{result['mean_sample_tokens']:.0f} tokens per sample"
    )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Accuracy vs N on a log2 axis: one line per method, beam search as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in result["methods"].items():
        n, mean, std = (np.asarray(curve[k], float) for k in ("n", "mean", "std"))
        style = "--" if name == rerank.ORACLE else "-"
        ax.plot(n, mean, style, marker="o", markersize=3, label=name)
        ax.fill_between(n, mean - std, mean + std, alpha=0.15)
    for row in result["beam_search"]:
        ax.scatter(
            [max(row["equivalent_n"], 1.0)],
            [row["accuracy"]],
            marker="*",
            s=120,
            zorder=3,
            label=f"PRM beam search W={row['beam_width']}, C={row['num_candidates']}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per problem; beam search at equal sampled tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result['num_problems']} problems, pass@1 = {result['pass@1']:.2f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def write(result: dict, out: epath.PathLike) -> tuple[str, str]:
    """Writes the json (atomically) and the png into `out` (local or gs://); returns their paths."""
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / RESULT_FILE, out / PLOT_FILE
    tmp = json_path.with_name(f"{RESULT_FILE}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(json_path)
    plot(result, str(png_path))
    return str(json_path), str(png_path)


# ----------------------------------------------------------------------------- CLI


def default_policy_step(policy: str, rm_workdirs: Sequence[str | None]) -> int | None:
    """The checkpoint of `policy` the reward models sampled their data from, if they came
    from `policy` with a set `rm_data.policy_step` or `init_from_step` (rm.py samples an
    under-trained one); else None, the newest."""
    from train.workdir import read_config

    def same(a: str, b: str) -> bool:
        return os.path.realpath(a.rstrip("/")) == os.path.realpath(b.rstrip("/"))

    for workdir in filter(None, rm_workdirs):
        config = read_config(workdir)
        rm_data = config.get("rm_data") or {}
        step = rm_data.get("policy_step") or config.get("init_from_step")
        if step and same(config.init_from, policy):
            return int(step)
    return None


def _load_reward_model(workdir: str | None, kind: str, tokenizer):
    """The reward model of `workdir` (None if not given), checked against the policy."""
    from rl.reward_model import load_reward_model

    if not workdir:
        return None
    rm = load_reward_model(workdir)
    if rm.kind != kind:
        raise ValueError(f"--{kind}={workdir} holds a {rm.kind!r} reward model, not {kind!r}")
    if rm.tokenizer.proto_bytes != tokenizer.proto_bytes:
        raise ValueError(
            f"--{kind}={workdir} has another tokenizer than the policy; train it "
            "with --config.init_from=<the policy workdir>"
        )
    return rm


def define_flags() -> None:
    """The CLI flags; defined on demand, so importing this module never clashes with others."""
    flags.DEFINE_string("policy", None, "The policy's train.main workdir.", required=True)
    flags.DEFINE_string("orm", None, "An ORM workdir (rm.py:kind=orm); omit to skip.")
    flags.DEFINE_string("prm", None, "A PRM workdir (rm.py:kind=prm); omit to skip.")
    flags.DEFINE_integer(
        "policy_step",
        None,
        "Policy checkpoint (default: the one --prm/--orm sampled their data from when they "
        "came from --policy with a set rm_data.policy_step or init_from_step; else the "
        "newest).",
    )
    flags.DEFINE_integer("num_problems", 64, "Held-out problems.")
    flags.DEFINE_integer("max_n", 64, "Samples per problem; curves run to it.")
    flags.DEFINE_float("temperature", 0.7, "Sampling temperature (> 0; docstring).")
    flags.DEFINE_string(
        "data_from",
        None,
        "Workdir whose data's --split holds the problems (default: --prm, else --orm, else "
        "--policy: the reward models' task and difficulty).",
    )
    flags.DEFINE_string("split", "test", "Split of --data_from's data, or of fresh problems.")
    flags.DEFINE_list("tasks", [], "Generate fresh problems of these tasks (equal weights).")
    flags.DEFINE_string("knobs", "", 'JSON {task: {knob: value}}, e.g. {"addition": {...}}.')
    flags.DEFINE_integer("seed", 0, "Seed of problems, sampling and subsets.")
    flags.DEFINE_integer("max_new_tokens", 0, "Per response (0: the policy's eval value).")
    flags.DEFINE_integer("batch_size", 4, "Problems per sampler call (x max_n rows).")
    flags.DEFINE_integer("rm_batch_size", 32, "Responses per reward-model call.")
    flags.DEFINE_integer("num_draws", 32, "Random subsets averaged per N.")
    flags.DEFINE_bool(
        "format_check", True, "Every method chooses among well-formed candidates (if any)."
    )
    flags.DEFINE_list("beam_widths", [], "Beam search widths to run (needs --prm).")
    flags.DEFINE_integer("beam_candidates", 4, "Continuations per beam and round.")
    flags.DEFINE_integer("beam_step_tokens", 32, "Tokens per decode call.")
    flags.DEFINE_integer("beam_token_budget", 0, "Sampled tokens per problem (0: no limit).")
    flags.DEFINE_integer("beam_batch_size", 4, "Problems per beam search batch.")
    flags.DEFINE_string("out", None, "Output folder (default: the policy workdir).")


def main(argv):
    """Runs the experiment from flags and writes its files."""
    del argv
    from train.workdir import load_run, read_config

    args = flags.FLAGS
    if args.temperature <= 0:
        raise app.UsageError("--temperature must be > 0: best-of-N needs distinct samples")
    widths = [int(w) for w in args.beam_widths]
    if widths and not args.prm:
        raise app.UsageError("--beam_widths needs --prm")
    step = args.policy_step
    if step is None:
        step = default_policy_step(args.policy, [args.prm, args.orm])
    run = load_run(args.policy, step=step)
    print(f"Policy: {args.policy}, checkpoint {run.step}")
    orm = _load_reward_model(args.orm, "orm", run.tokenizer)
    prm = _load_reward_model(args.prm, "prm", run.tokenizer)
    data_from = args.data_from or args.prm or args.orm or args.policy
    problems = load_problems(
        args.policy,
        run.config,
        data_from=(data_from, read_config(data_from)),
        split=args.split,
        num=args.num_problems,
        tasks=args.tasks,
        knobs=parse_knobs(args.knobs),
        seed=args.seed,
    )
    if not problems:
        raise app.UsageError("no problems: check --split, --tasks and --num_problems")
    max_new = args.max_new_tokens or run.config.eval.max_new_tokens
    beam_configs = [
        BeamConfig(
            beam_width=width,
            num_candidates=args.beam_candidates,
            max_new_tokens=max_new,
            max_step_tokens=args.beam_step_tokens,
            token_budget=args.beam_token_budget,
            temperature=args.temperature,
        )
        for width in widths
    ]
    result = experiment(
        run,
        orm,
        prm,
        problems,
        max_n=args.max_n,
        temperature=args.temperature,
        max_new=max_new,
        batch_size=args.batch_size,
        rm_batch_size=args.rm_batch_size,
        num_draws=args.num_draws,
        seed=args.seed,
        beam_configs=beam_configs,
        beam_batch_size=args.beam_batch_size,
        format_check=args.format_check,
    )
    settings = {name: args[name].value for name in _RECORDED_FLAGS}
    result = {
        "config": {
            **settings,
            "data_from": data_from,
            "policy_step": run.step,
            "max_new_tokens": max_new,
            "tasks": sorted({p.task for p in problems}),
        },
        **result,
    }
    json_path, png_path = write(result, args.out or args.policy)
    low, high = PASS_AT_1_RANGE
    if not low <= result["pass@1"] <= high:
        logging.warning(
            "pass@1 = %.2f is outside [%.1f, %.1f]: reranking has little room; change "
            "--tasks/--knobs or --policy_step",
            result["pass@1"],
            low,
            high,
        )
    print(format_table(result))
    print(f"wrote {json_path} and {png_path}")


_RECORDED_FLAGS = (
    "policy",
    "orm",
    "prm",
    "num_problems",
    "max_n",
    "temperature",
    "data_from",
    "split",
    "knobs",
    "seed",
    "num_draws",
    "format_check",
    "beam_widths",
    "beam_candidates",
    "beam_step_tokens",
    "beam_token_budget",
)

if __name__ == "__main__":
    define_flags()
    app.run(main)
