"""Before/after: SFT vs RL policy, greedy and pass@n, at the training difficulty and one harder.

    python -m rl.compare --workdir=workdirs/rl     # the table of a finished RL run
    python -m rl.compare --workdir=workdirs/rl_ppo --workdir=workdirs/rl_grpo ...

Given several runs from the same SFT policy and data, it scores the SFT policy once and every
run on the same problems, one row each (the RL algorithm comparison in the README).

Problems are held out: the training difficulty uses the first `eval.num_problems` problems of
`eval.split` of the RL run's data (0: the whole split, as in the SFT evaluation), topped up to
`rl.compare.num_problems` (or `--num_problems`) with fresh problems of the same mix, and the
harder level as many fresh problems of `rl.compare.harder_task` with `harder_knobs`; no fresh
prompt is in the train split or drawn twice. 64 problems leave a greedy accuracy uncertain by
about +-6 points (one standard error), 256 by +-3. The RL objectives' evaluation ("rl")
scores the policy greedily at the training difficulty; at the end of a run, if
`rl.compare.table`, it prints the table.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from data.builder import canonical_prompt, load_split, record_to_problem
from data.tasks import generate_problems
from data.tasks.base import Problem
from rl.generate import generate
from rl.rewards import verify_response
from rl.search import pass_at_n
from train.evaluate import register_evaluation

TRAIN_LEVEL, HARDER_LEVEL = "train difficulty", "harder"


def held_out_levels(config, prepared, num_problems: int = 0) -> dict[str, list[Problem]]:
    """{level name: problems}: `eval.split`'s first `eval.num_problems` (0: all) topped up to
    `num_problems` with fresh ones of the run's mix, and as many harder problems; no fresh
    problem was seen in training."""
    split, count = config.eval.split, config.eval.num_problems
    source = load_split(prepared.builder, split)
    level = [record_to_problem(source[i]) for i in range(min(count or len(source), len(source)))]
    if not level:
        raise ValueError(f"eval.split={split!r} has no problems: raise data.{split}_size")
    train = load_split(prepared.builder, config.rl.split)
    seen = {canonical_prompt(train[i]["prompt"]) for i in range(len(train))}
    seen |= {canonical_prompt(p.prompt) for p in level}

    def fresh(mix, n: int, stream: int) -> list[Problem]:
        """Up to n problems of `mix` whose prompts are not in `seen` (which takes them)."""
        kept = []
        for p in generate_problems(mix, 2 * n, config.data.seed + stream, "test"):
            if len(kept) < n and canonical_prompt(p.prompt) not in seen:
                seen.add(canonical_prompt(p.prompt))
                kept.append(p)
        return kept

    if num_problems > len(level):
        mix = {name: dict(entry) for name, entry in config.data.tasks.items()}
        level += fresh(mix, num_problems - len(level), stream=2)
    c = config.rl.compare
    harder = fresh({c.harder_task: {"weight": 1.0, "knobs": dict(c.harder_knobs)}}, len(level), 1)
    return {TRAIN_LEVEL: level, HARDER_LEVEL: harder}


def policy_scores(
    params, model_cfg, tokenizer, problems, config, *, samples: bool = True, seed: int = 0
) -> dict[str, float]:
    """Greedy accuracy, and (with `samples`) sampled pass@1 and pass@n of one policy on the
    first `rl.compare.sample_problems` problems (0: all): n samples cost n greedy runs."""
    c = config.rl.compare
    questions = [p.prompt for p in problems]
    kwargs = dict(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
    greedy = generate(params, model_cfg, tokenizer, questions, greedy=True, **kwargs)
    correct_P = [verify_response(p, g[0].text) for p, g in zip(problems, greedy, strict=True)]
    scores = {"greedy": float(np.mean(correct_P))}
    if samples:
        sampled_problems = problems[: c.get("sample_problems", 0) or len(problems)]
        sampled = generate(
            params,
            model_cfg,
            tokenizer,
            [p.prompt for p in sampled_problems],
            greedy=False,
            num_samples=c.num_samples,
            temperature=c.temperature,
            rng=jax.random.PRNGKey(seed),
            **kwargs,
        )
        correct_PxN = np.asarray(
            [
                [verify_response(p, s.text) for s in row]
                for p, row in zip(sampled_problems, sampled, strict=True)
            ]
        )
        scores["pass@1"] = float(correct_PxN.mean())
        scores[f"pass@{c.num_samples}"] = float(np.mean(pass_at_n(correct_PxN, c.num_samples)))
    return scores


def format_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """{level: {policy: scores}} as aligned text, one row per (level, policy)."""
    columns = sorted({k for by_policy in table.values() for s in by_policy.values() for k in s})
    columns.sort(key=lambda k: (k != "greedy", len(k), k))
    width = max(len("policy"), *(len(p) for by_policy in table.values() for p in by_policy)) + 2
    lines = [f"{'level':<18}{'policy':<{width}}" + "".join(f"{k:>10}" for k in columns)]
    for level, by_policy in table.items():
        for policy, scores in by_policy.items():
            cells = "".join(f"{scores[k]:>10.3f}" if k in scores else f"{'-':>10}" for k in columns)
            lines.append(f"{level:<18}{policy:<{width}}{cells}")
    return "\n".join(lines)


def levels_to_sample(compare_config, harder_samples: bool | None = None) -> tuple[str, ...] | None:
    """The levels whose pass@n is sampled, for `compare`: None (every level), or only the
    training difficulty when `harder_samples` (default: rl.compare.harder_samples) is False."""
    if harder_samples is None:
        harder_samples = compare_config.get("harder_samples", True)
    return None if harder_samples else (TRAIN_LEVEL,)


def compare(policies: dict, model_cfg, tokenizer, levels, config, sampled_levels=None) -> dict:
    """{level: {policy name: scores}} for every policy and level; pass@n only at
    `sampled_levels` (None: every level)."""
    seed = config.seed + 1
    return {
        level: {
            name: policy_scores(
                params,
                model_cfg,
                tokenizer,
                problems,
                config,
                samples=sampled_levels is None or level in sampled_levels,
                seed=seed,
            )
            for name, params in policies.items()
        }
        for level, problems in levels.items()
    }


def reference_params(config, model_cfg, like):
    """The SFT policy's parameters (rl.ref_from, else init_from: a workdir or a Hugging Face
    directory), placed in the shardings of `like`, the RL policy's parameters."""
    from rl.rollout import reference_of
    from train import init_from

    source = init_from.find_source(*reference_of(config))
    return init_from.load_params(source, model_cfg, like)


@register_evaluation("rl")
def make_rl_evaluation(config, prepared, model_cfg, model):
    """Greedy accuracy at the training difficulty; at the end, with `rl.compare.table`, the SFT
    vs RL table (printed)."""
    del model
    levels = {}

    def eval_fn(params, step: int) -> dict:
        if not levels:
            levels.update(held_out_levels(config, prepared, config.rl.compare.num_problems))
        tokenizer, c = prepared.tokenizer, config.rl.compare
        if step < config.num_steps or not c.table:
            problems = levels[TRAIN_LEVEL]
            scores = policy_scores(params, model_cfg, tokenizer, problems, config, samples=False)
            return {"accuracy": scores["greedy"], "num_problems": len(problems)}
        policies = {"SFT": reference_params(config, model_cfg, params), "RL": params}
        table = compare(policies, model_cfg, tokenizer, levels, config, levels_to_sample(c))
        text = format_table(table)
        print(f"Before/after RL ({config.objective}):\n{text}", flush=True)
        rl_train, rl_harder = table[TRAIN_LEVEL]["RL"], table[HARDER_LEVEL]["RL"]
        return {
            "accuracy": rl_train["greedy"],
            f"pass_at_{c.num_samples}": rl_train[f"pass@{c.num_samples}"],
            "harder_accuracy": rl_harder["greedy"],
            "sft_accuracy": table[TRAIN_LEVEL]["SFT"]["greedy"],
            "num_problems": len(levels[TRAIN_LEVEL]),
            "compare": table,
            "table": text,
        }

    return eval_fn


_TABLE_ONLY = ("table", "num_problems", "sample_problems", "harder_samples")


def _same_start(runs) -> None:
    """Raises unless every run starts from the same SFT policy and draws the same eval problems."""
    first = runs[0].config
    for run in runs[1:]:
        c = run.config
        for key in ("init_from", "rl.ref_from", "data", "eval", "rl.compare"):
            a, b = first, c
            for part in key.split("."):
                a, b = a[part], b[part]
            if key == "rl.compare":  # the table's own settings; --num_problems sets the count
                a, b = ({k: v for k, v in x.items() if k not in _TABLE_ONLY} for x in (a, b))
            if a != b:
                raise ValueError(
                    f"runs differ in {key}: compare runs of the same SFT policy and eval set"
                )


def main(argv):
    """Prints the before/after table of one RL run, or SFT and every run of several."""
    del argv
    from data.build import prepare
    from train.workdir import load_run

    workdirs = flags.FLAGS.workdir
    runs = [load_run(workdir) for workdir in workdirs]
    _same_start(runs)
    first = runs[0]
    prepared = prepare(first.config.data, workdirs[0], verbose=False)
    num_problems = flags.FLAGS.num_problems
    if num_problems is None:
        num_problems = first.config.rl.compare.get("num_problems", 0)
    levels = held_out_levels(first.config, prepared, num_problems)
    policies = {"SFT": reference_params(first.config, first.model_cfg, first.params)}
    names = ["RL"] if len(runs) == 1 else [run.config.objective for run in runs]
    if len(set(names)) < len(names):  # e.g. outcome vs outcome+PRM rewards: name by workdir
        names = [str(workdir).rstrip("/").rsplit("/", 1)[-1] for workdir in workdirs]
    policies |= {name: run.params for name, run in zip(names, runs, strict=True)}
    sampled = levels_to_sample(first.config.rl.compare, flags.FLAGS.harder_samples)
    if not flags.FLAGS.samples:
        sampled = ()
    table = compare(policies, first.model_cfg, first.tokenizer, levels, first.config, sampled)
    print(format_table(table))
    if flags.FLAGS.out:
        import json

        from etils import epath

        epath.Path(flags.FLAGS.out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    flags.DEFINE_multi_string(
        "workdir", None, "Finished RL run(s) (train.main --config=rl.py).", required=True
    )
    flags.DEFINE_string("out", "", "Optional JSON path for {level: {policy: scores}}.")
    flags.DEFINE_bool(
        "harder_samples",
        None,
        "Also sample pass@n at the harder level (default: rl.compare.harder_samples).",
    )
    flags.DEFINE_bool("samples", True, "Sample pass@n at all; False scores greedy only.")
    flags.DEFINE_integer(
        "num_problems",
        None,
        "Problems per level: the eval split's, topped up with fresh held-out ones "
        "(default: the first run's rl.compare.num_problems).",
    )
    app.run(main)
