"""Does redacting thoughts from earlier turns cost accuracy? Context saved against accuracy.

    python -m rl.redaction_eval --workdir=DIR [--num_conversations=48] [--turns=3]

Conversations start from held-out problems of the run's test split that have a whole-number
answer and go on with follow-ups on the previous true answer (`data.multiturn`): "What is
482 + 37?", "Now add 17 to that.", "Now multiply that by 3.". Each conversation is answered
twice, greedily, turn by turn: once with the thoughts of finished turns redacted from the
context (what `rl.chat` does) and once with the full context. Every turn is checked against
its true answer. Writes DIR/redaction_eval.json and DIR/redaction_eval.md: per turn, the
context length each way, the tokens saved, and both accuracies. Targets: at least 50% fewer
context tokens by the last turn, at most 2 points less accuracy.

A prompt that leaves no room for `max_new_tokens` in the model's context is not generated:
it counts as wrong and as an overflow.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from etils import epath

from data.format import Dialogue, Turn
from data.multiturn import conversation, conversation_dialogue, whole_answer
from data.tasks.base import Problem
from model import sampler
from rl.chat import add_exchange, context_stats, prompt_tokens
from train.evaluate import score_response

MODES = ("redacted", "full")
TARGET_SAVING = 0.5  # fraction of context tokens saved at the last turn
TARGET_MAX_DROP = 0.02  # accuracy lost to redaction, as a fraction
JSON_FILE, MARKDOWN_FILE = "redaction_eval.json", "redaction_eval.md"


def build_conversations(
    problems: Sequence[Problem], num: int, turns: int, seed: int
) -> list[tuple[Problem, ...]]:
    """Up to `num` conversations of `turns` turns, from the problems with whole answers."""
    rng = np.random.default_rng(seed)
    out = []
    for problem in problems:
        if len(out) == num:
            break
        if whole_answer(problem) is not None:
            out.append(conversation(problem, rng, num_turns=turns))
    return out


def complete(run, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int):
    """Greedy replies (text without <|eot_id|>) to token prompts; None where one does not fit."""
    tokenizer, cfg = run.tokenizer, run.model_cfg
    fits = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= cfg.max_seq_len]
    replies: list[str | None] = [None] * len(prompts)
    for start in range(0, len(fits), batch_size):
        rows = fits[start : start + batch_size]
        batch = [list(prompts[i]) for i in rows]
        batch += [batch[0]] * (batch_size - len(batch))  # one compiled batch shape
        out = sampler.sample(
            run.params,
            cfg,
            batch,
            rng=jax.random.PRNGKey(0),
            max_new_tokens=max_new_tokens,
            stop_tokens=(tokenizer.eot_id,),
            greedy=True,
            pad_id=tokenizer.pad_id,
        )
        tokens, lengths = np.asarray(out.tokens_BxNxT[:, 0]), np.asarray(out.lengths_BxN[:, 0])
        done = np.asarray(out.done_BxN[:, 0])
        for row, i in enumerate(rows):
            ids = tokens[row, : lengths[row] - int(done[row])]
            replies[i] = tokenizer.decode([int(t) for t in ids])
    return replies


def run_conversations(
    run, conversations: Sequence[Sequence[Problem]], *, max_new_tokens: int, batch_size: int
) -> dict[str, list[list[dict]]]:
    """Per mode, per conversation, per turn: token counts, the reply and its scores.

    `prompt_tokens` is what the model was fed at that turn; `context_tokens` the context
    the conversation holds after it (what rl.chat prints), both as the mode shows them.
    """
    cache: dict[tuple[int, ...], str | None] = {}  # both modes ask the same first turn
    results = {}
    for mode in MODES:
        redact = mode == "redacted"
        dialogues = [Dialogue(()) for _ in conversations]
        rows: list[list[dict]] = [[] for _ in conversations]
        for turn in range(len(conversations[0]) if conversations else 0):
            questions = [c[turn].prompt for c in conversations]
            prompts = [
                tuple(prompt_tokens(Dialogue((*d.turns, Turn("user", q))), run.tokenizer, redact))
                for d, q in zip(dialogues, questions, strict=True)
            ]
            new = sorted({p for p in prompts if p not in cache})
            replies = complete(run, new, max_new_tokens=max_new_tokens, batch_size=batch_size)
            cache.update(zip(new, replies, strict=True))
            for i, (c, prompt) in enumerate(zip(conversations, prompts, strict=True)):
                reply = cache[prompt] or ""
                dialogues[i] = add_exchange(dialogues[i], questions[i], reply)
                stats = context_stats(dialogues[i], run.tokenizer, redact)
                rows[i].append(
                    {
                        "prompt_tokens": len(prompt),
                        "context_tokens": stats.tokens,
                        "overflow": cache[prompt] is None,
                        "response": reply,
                        **score_response(c[turn], reply, run.tokenizer),
                    }
                )
        results[mode] = rows
    return results


def reference_tokens(conversations, tokenizer) -> dict[str, dict[str, list[float]]]:
    """Mean prompt and context tokens per turn, per mode, with the true traces as replies."""
    out = {}
    for mode in MODES:
        redact, prompts, contexts = mode == "redacted", [], []
        for turn in range(len(conversations[0]) if conversations else 0):
            asked = [
                Dialogue(
                    (*conversation_dialogue(c[:turn], False).turns, Turn("user", c[turn].prompt))
                )
                for c in conversations
            ]
            answered = [conversation_dialogue(c[: turn + 1], False) for c in conversations]
            prompts.append(
                float(np.mean([len(prompt_tokens(d, tokenizer, redact)) for d in asked]))
            )
            contexts.append(
                float(np.mean([context_stats(d, tokenizer, redact).tokens for d in answered]))
            )
        out[mode] = {"prompt_tokens": prompts, "context_tokens": contexts}
    return out


def _saving(redacted: float, full: float) -> float:
    """Fraction of tokens redaction removed."""
    return 1.0 - redacted / max(full, 1.0)


def summarize(results: dict[str, list[list[dict]]], reference: dict) -> dict:
    """The per-turn table and the verdict on the targets (on the context after the last turn)."""
    per_turn = []
    num_turns = len(reference["full"]["prompt_tokens"])
    for turn in range(num_turns):
        row: dict = {"turn": turn + 1}
        for mode in MODES:
            cells = [conv[turn] for conv in results[mode]]
            row[mode] = {
                key: float(np.mean([c[key] for c in cells]))
                for key in ("correct", "well_formed", "prompt_tokens", "context_tokens")
            }
            row[mode]["accuracy"] = row[mode].pop("correct")
            row[mode]["overflow"] = int(sum(c["overflow"] for c in cells))
        for key in ("prompt", "context"):
            tokens = f"{key}_tokens"
            row[f"{key}_saving"] = _saving(row["redacted"][tokens], row["full"][tokens])
            row[f"reference_{key}_saving"] = _saving(
                reference["redacted"][tokens][turn], reference["full"][tokens][turn]
            )
        row["accuracy_drop"] = row["full"]["accuracy"] - row["redacted"]["accuracy"]
        per_turn.append(row)
    overall = {
        mode: float(np.mean([c["correct"] for conv in results[mode] for c in conv]))
        for mode in MODES
    }
    drop = overall["full"] - overall["redacted"]
    return {
        "num_conversations": len(results["full"]),
        "turns": num_turns,
        "per_turn": per_turn,
        "accuracy": overall,
        "accuracy_drop": drop,
        "targets": {"min_context_saving": TARGET_SAVING, "max_accuracy_drop": TARGET_MAX_DROP},
        "meets_token_target": bool(per_turn) and per_turn[-1]["context_saving"] >= TARGET_SAVING,
        "meets_accuracy_target": drop <= TARGET_MAX_DROP,
    }


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(summary: dict) -> str:
    """The summary as a markdown table with the verdict."""
    lines = [
        f"# Redaction: {summary['num_conversations']} conversations of {summary['turns']} turns",
        "",
        "| turn | prompt full / redacted | saved | context full / redacted | saved | reference "
        "saved | accuracy full | accuracy redacted | drop | overflow |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in summary["per_turn"]:
        full, red = row["full"], row["redacted"]
        lines.append(
            f"| {row['turn']} | {full['prompt_tokens']:.1f} / {red['prompt_tokens']:.1f} "
            f"| {row['prompt_saving']:.1%} "
            f"| {full['context_tokens']:.1f} / {red['context_tokens']:.1f} "
            f"| {row['context_saving']:.1%} | {row['reference_context_saving']:.1%} "
            f"| {full['accuracy']:.1%} | {red['accuracy']:.1%} | {row['accuracy_drop']:+.1%} "
            f"| {full['overflow']} / {red['overflow']} |"
        )
    acc = summary["accuracy"]
    lines += [
        "",
        f"Overall accuracy: full {acc['full']:.1%}, redacted {acc['redacted']:.1%} "
        f"(drop {summary['accuracy_drop']:+.1%}).",
        f"- Context saving after the last turn >= {TARGET_SAVING:.0%}: "
        f"{_verdict(summary['meets_token_target'])}.",
        f"- Accuracy drop <= {TARGET_MAX_DROP:.0%} points: "
        f"{_verdict(summary['meets_accuracy_target'])}.",
        "",
        "Prompt = tokens fed at that turn. Context = tokens the conversation holds after the "
        "turn (what rl.chat prints). Reference = the context saving with the true traces as "
        "replies. Drop = accuracy full - accuracy redacted. Overflow = prompts (full / "
        "redacted) with no room left for a reply, counted wrong.",
    ]
    return "\n".join(lines) + "\n"


def evaluate_redaction(
    run,
    problems: Sequence[Problem],
    *,
    num: int,
    turns: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    num_shown: int = 2,
) -> dict:
    """The redaction_eval.json dict for a loaded run and candidate first problems."""
    conversations = build_conversations(problems, num, turns, seed)
    if not conversations:
        raise ValueError("no problem with a whole-number answer to start a conversation from")
    results = run_conversations(
        run, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    summary = summarize(results, reference_tokens(conversations, run.tokenizer))
    summary["step"] = run.step
    summary["samples"] = [
        {
            "questions": [p.prompt for p in c],
            "expected": [p.answer for p in c],
            **{mode: [cell["response"] for cell in results[mode][i]] for mode in MODES},
        }
        for i, c in enumerate(conversations[:num_shown])
    ]
    return summary


def write(summary: dict, out_dir: epath.PathLike) -> tuple[str, str]:
    """Writes the JSON and markdown files into `out_dir` (local or gs://); returns their paths."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / JSON_FILE, out / MARKDOWN_FILE
    json_path.write_text(json.dumps(summary, indent=2))
    md_path.write_text(markdown(summary))
    return str(json_path), str(md_path)


def load_test_problems(run, workdir: str) -> list[Problem]:
    """The run's held-out test split, as problems."""
    from data.build import prepare
    from data.builder import load_split, record_to_problem

    prepared = prepare(run.config.data, workdir, verbose=False)
    source = load_split(prepared.builder, "test")
    return [record_to_problem(source[i]) for i in range(len(source))]


def main(argv):
    """Evaluates --workdir's newest checkpoint; writes the table next to it (or to --out)."""
    del argv
    from train.workdir import load_run

    f = flags.FLAGS
    run = load_run(f.workdir)
    summary = evaluate_redaction(
        run,
        load_test_problems(run, f.workdir),
        num=f.num_conversations,
        turns=f.turns,
        max_new_tokens=f.max_new_tokens,
        batch_size=f.batch_size,
        seed=f.seed,
    )
    _, md_path = write(summary, f.out or f.workdir)
    print(epath.Path(md_path).read_text())


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A train.main workdir.", required=True)
    flags.DEFINE_string("out", None, "Folder for the JSON and markdown (default: --workdir).")
    flags.DEFINE_integer("num_conversations", 48, "Conversations to run.")
    flags.DEFINE_integer("turns", 3, "Turns per conversation.")
    flags.DEFINE_integer("max_new_tokens", 320, "Tokens per reply at most.")
    flags.DEFINE_integer("batch_size", 16, "Prompts per sampler batch.")
    flags.DEFINE_integer("seed", 0, "Seed of the follow-up questions.")
    app.run(main)
