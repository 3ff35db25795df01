"""Evaluation: greedy answers to held-out problems, checked by the task verifiers.

    python -m train.evaluate --workdir=DIR [--split=test] [--num_problems=N]

writes DIR/eval.json with per-task accuracy, the rate of well-formed outputs, the mean
thought length in tokens and the number of problems. train.main runs the same function at
intervals and at the end of every run.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags, logging
from etils import epath

from data.builder import record_to_problem
from data.format import parse_assistant
from data.tasks import verify
from data.tasks.base import Problem
from rl.generate import generate

EVAL_FILE = "eval.json"


def score_response(problem: Problem, text: str, tokenizer) -> dict:
    """Verifier score, well-formedness and thought length of one response; never raises."""
    parsed = parse_assistant(text)
    visible = parsed.turn.content if parsed.turn.content else text
    thoughts = [step for block in parsed.turn.blocks for step in block.thoughts]
    return {
        "correct": float(verify(problem, visible)),
        "well_formed": float(parsed.well_formed),
        "thought_tokens": len(tokenizer.encode("\n".join(thoughts))) if thoughts else 0,
        "answer": parsed.answer,
    }


def summarize(rows: list[dict]) -> dict:
    """Means of the per-response scores."""
    if not rows:
        return {"accuracy": 0.0, "well_formed": 0.0, "mean_thought_tokens": 0.0, "num_problems": 0}
    return {
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "well_formed": float(np.mean([r["well_formed"] for r in rows])),
        "mean_thought_tokens": float(np.mean([r["thought_tokens"] for r in rows])),
        "num_problems": len(rows),
    }


def evaluate(params, model_cfg, tokenizer, records: list[dict], eval_config, *, num_shown=6):
    """Greedy-decodes every record's prompt and scores it; returns the eval.json dict."""
    problems = [record_to_problem(r) for r in records]
    # A batch decodes until its longest response ends, and response lengths follow the task
    # (letter counts ~30 thought tokens, multiplications ~220): batching one task at a time
    # cuts decode steps. Greedy rows do not depend on their batch-mates, so scores are equal.
    order = sorted(range(len(problems)), key=lambda i: problems[i].task)
    sorted_generations = generate(
        params,
        model_cfg,
        tokenizer,
        [problems[i].prompt for i in order],
        max_new_tokens=eval_config.max_new_tokens,
        batch_size=eval_config.batch_size,
        greedy=True,
    )
    generations = [None] * len(problems)
    for i, generation in zip(order, sorted_generations, strict=True):
        generations[i] = generation
    rows, by_task = [], collections.defaultdict(list)
    for problem, (gen,) in zip(problems, generations, strict=True):
        row = {**score_response(problem, gen.text, tokenizer), "finished": gen.finished}
        rows.append(row)
        by_task[problem.task].append(row)
    result = summarize(rows)
    result["per_task"] = {task: summarize(task_rows) for task, task_rows in sorted(by_task.items())}
    # One small row per problem, so reports can relate thought length to correctness.
    result["per_problem"] = [
        {
            "task": p.task,
            "correct": r["correct"],
            "well_formed": r["well_formed"],
            "thought_tokens": r["thought_tokens"],
        }
        for p, r in zip(problems, rows, strict=True)
    ]
    result["samples"] = [
        {
            "task": p.task,
            "prompt": p.prompt,
            "expected": p.answer,
            "response": g[0].text,
            "correct": r["correct"],
        }
        for p, g, r in list(zip(problems, generations, rows, strict=True))[:num_shown]
    ]
    return result


EvalFn = Callable[[Any, int], dict]  # (params, step) -> the eval.json dict
EVALUATIONS: dict[str, Callable[..., EvalFn]] = {}


def register_evaluation(name: str):
    """Decorator registering `factory(config, prepared, model_cfg, model) -> eval_fn`."""

    def wrap(factory):
        EVALUATIONS[name] = factory
        return factory

    return wrap


def make_evaluation(name: str, config, prepared, model_cfg, model) -> EvalFn:
    """The evaluation registered as `name`, bound to a run."""
    if name not in EVALUATIONS:
        raise KeyError(f"Unknown evaluation {name!r}; registered: {sorted(EVALUATIONS)}")
    return EVALUATIONS[name](config, prepared, model_cfg, model)


@register_evaluation("generate")
def make_generate_evaluation(config, prepared, model_cfg, model) -> EvalFn:
    """Greedy answers to `config.eval.split`, scored by the task verifiers."""
    del model
    records = []  # loaded on first use, then reused

    def eval_fn(params, step: int) -> dict:
        del step
        if not records:
            records.extend(load_eval_records(prepared, config.eval.split, config.eval.num_problems))
        result = evaluate(params, model_cfg, prepared.tokenizer, records, config.eval)
        logging.info("Evaluation:\n%s", format_table(result))
        return result

    return eval_fn


def load_eval_records(prepared, split: str, num_problems: int) -> list[dict]:
    """The first `num_problems` records of `split` (all if 0), as plain dicts."""
    from data.builder import load_split

    source = load_split(prepared.builder, split)
    n = len(source) if not num_problems else min(num_problems, len(source))
    return [dict(source[i]) for i in range(n)]


def scalar_summary(result: dict) -> dict:
    """The top-level numbers of an eval.json dict (what TensorBoard and the console get)."""
    return {k: v for k, v in result.items() if isinstance(v, int | float)}


def write_eval(workdir: epath.PathLike, result: dict, step: int, *, name: str = EVAL_FILE) -> None:
    """Writes `workdir/name` (a local path or gs://) so a reader never sees half a file."""
    if not name or "/" in name:
        raise ValueError(f"the eval file name must be a plain file name, got {name!r}")
    path = epath.Path(workdir) / name
    # Local files are renamed into place; a cloud object appears whole anyway.
    tmp = path.with_name(f"{name}.tmp")
    tmp.write_text(json.dumps({"step": step, **result}, indent=2))
    tmp.replace(path)


def format_table(result: dict) -> str:
    """A plain-text per-task accuracy table."""
    lines = [f"{'task':<16}{'accuracy':>10}{'well-formed':>13}{'thought tok':>13}{'n':>6}"]
    for task, r in result["per_task"].items():
        lines.append(
            f"{task:<16}{r['accuracy']:>10.3f}{r['well_formed']:>13.3f}"
            f"{r['mean_thought_tokens']:>13.1f}{r['num_problems']:>6}"
        )
    lines.append(
        f"{'all':<16}{result['accuracy']:>10.3f}{result['well_formed']:>13.3f}"
        f"{result['mean_thought_tokens']:>13.1f}{result['num_problems']:>6}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- reward models


def average_ranks(x) -> np.ndarray:
    """1-based ranks of the values of x; tied values share the mean of their ranks."""
    x = np.asarray(x, np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def roc_auc(scores, labels) -> float | None:
    """ROC AUC by the Mann-Whitney rank formula (ties count half); None without both classes."""
    positive = np.asarray(labels, np.float64).reshape(-1) >= 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    rank_sum = average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def first_error_hit(step_probs, step_labels, step_mask) -> bool | None:
    """Whether the first step scored < 0.5 is the first step labelled wrong (None: none is)."""
    wrong = np.flatnonzero((np.asarray(step_mask) > 0) & (np.asarray(step_labels) < 0.5))
    if not wrong.size:
        return None
    flagged = np.flatnonzero(np.asarray(step_probs) < 0.5)
    return bool(flagged.size and flagged[0] == wrong[0])


def reward_metrics(rows: list[dict]) -> dict:
    """ORM/PRM AUC and accuracy at 0.5, and first-error localization, over scored records."""
    final = np.asarray([r["final"] for r in rows], np.float64)
    orm = np.asarray([r["orm_label"] for r in rows], np.float64)
    mask = np.concatenate([r["step_mask"] for r in rows] or [np.zeros(0)]) > 0
    probs = np.concatenate([r["steps"] for r in rows] or [np.zeros(0)])[mask]
    labels = np.concatenate([r["step_labels"] for r in rows] or [np.zeros(0)])[mask]
    hits = [first_error_hit(r["steps"], r["step_labels"], r["step_mask"]) for r in rows]
    hits = [h for h in hits if h is not None]  # traces with a step labelled wrong
    return {
        "orm_auc": roc_auc(final, orm),
        "orm_accuracy": float(np.mean((final >= 0.5) == (orm >= 0.5))) if rows else None,
        "prm_auc": roc_auc(probs, labels),
        "prm_accuracy": float(np.mean((probs >= 0.5) == (labels >= 0.5))) if probs.size else None,
        "first_error_accuracy": float(np.mean(hits)) if hits else None,
        "num_records": len(rows),
        "num_steps": int(mask.sum()),
        "num_wrong_traces": len(hits),
    }


def evaluate_reward_model(rm, records: list[dict], *, batch_size: int) -> dict:
    """Scores every RM record with `rm` (rl.reward_model) and compares with its labels.

    Both the last-token (ORM) and the step-end (PRM) numbers are computed for either kind
    of model; the ones of the other kind show how far its head transfers. AUCs are None
    when a set lacks one of the classes.
    """
    from rl.reward_model import score_tokens

    cuts = [int(r["prompt_length"]) for r in records]
    scores = score_tokens(
        rm,
        [r["tokens"][:cut] for r, cut in zip(records, cuts, strict=True)],
        [r["tokens"][cut:] for r, cut in zip(records, cuts, strict=True)],
        batch_size=batch_size,
    )
    rows = []
    for record, score in zip(records, scores, strict=True):
        if score.steps.size != len(record["step_labels"]):
            raise ValueError(
                f"a {record['source']} record has {len(record['step_labels'])} step labels but "
                f"{score.steps.size} step ends: was it built with another tokenizer?"
            )
        rows.append(
            {
                "source": record["source"],
                "final": score.final,
                "steps": score.steps,
                "orm_label": record["orm_label"],
                "step_labels": np.asarray(record["step_labels"], np.float64),
                "step_mask": np.asarray(record["step_mask"], np.float64),
            }
        )
    result = reward_metrics(rows)
    result["kind"] = rm.kind
    result["per_source"] = {
        source: reward_metrics([r for r in rows if r["source"] == source])
        for source in sorted({r["source"] for r in rows})
    }
    return result


@register_evaluation("reward")
def make_reward_evaluation(config, prepared, model_cfg, model) -> EvalFn:
    """A reward model on the held-out RM data (rl.rm_data's "validation" split)."""
    del model
    from rl.reward_model import RewardModel
    from rl.rm_data import load_rm_split

    records = []  # loaded on first use, then reused

    def eval_fn(params, step: int) -> dict:
        del step
        if not records:
            source = load_rm_split(config, prepared, "validation")
            records.extend(source[i] for i in range(len(source)))
        rm = RewardModel(config.objective, params, model_cfg, prepared.tokenizer)
        result = evaluate_reward_model(rm, records, batch_size=config.eval.batch_size)
        logging.info("Reward evaluation: %s", scalar_summary(result))
        return result

    return eval_fn


def main(argv):
    """Evaluates the newest checkpoint of --workdir and writes eval.json (or --out_name)."""
    del argv
    from data.build import prepare
    from model.transformer import Transformer
    from train.objectives import get_objective
    from train.workdir import load_run

    args = flags.FLAGS
    run = load_run(args.workdir)
    config = run.config
    if args.split:
        config.eval.split = args.split
    if args.num_problems is not None:
        config.eval.num_problems = args.num_problems
    if args.test_size is not None:
        # A larger held-out split for tighter error bars: each task's problems come from
        # its own stream seeded by (seed, task, split), so the run's own test problems
        # come first, and problems whose prompt is in the train split are still dropped.
        # The data is built beside the run's (another builder config); its tokenizer stays.
        config.data.test_size = args.test_size
    objective = get_objective(config.objective)
    prepared = prepare(config.data, args.workdir)
    model = Transformer(run.model_cfg, heads=objective.heads)
    eval_fn = make_evaluation(objective.evaluation, config, prepared, run.model_cfg, model)
    result = eval_fn(run.params, run.step)
    write_eval(args.workdir, result, run.step, name=args.out_name)
    print(json.dumps(scalar_summary(result), indent=1))


if __name__ == "__main__":
    # Flags are defined here, not at import, because train.main imports this module.
    flags.DEFINE_string("workdir", None, "A train.main workdir.", required=True)
    flags.DEFINE_string("split", None, "Split to evaluate (default: the run's eval.split).")
    flags.DEFINE_integer("num_problems", None, "Problems to evaluate (0: all).")
    flags.DEFINE_integer(
        "test_size", None, "Build the test split with this many problems (default: the run's)."
    )
    flags.DEFINE_string("out_name", EVAL_FILE, "File in --workdir the result is written to.")
    app.run(main)
