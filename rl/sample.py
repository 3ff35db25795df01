"""Answer questions with a trained run.

    python -m rl.sample --workdir=DIR --prompt="What is 482 * 37?" [--show_thoughts] [--raw]
    python -m rl.sample --workdir=DIR --prompt="..." --samples=8 --temperature=0.8 --rerank=vote
    python -m rl.sample --workdir=DIR --prompts_file=questions.txt   # one JSON line each

`--prompt` streams the reply through the o1-style display (`rl.display`): each thinking
block's headline, a live count of its thought tokens, its summary, then the visible answer;
`--raw` prints the raw text instead. Greedy by default; `--temperature` > 0 samples. With
`--samples=N`, N replies are sampled and the one `--rerank` picks (majority vote, or the
reward model of `--orm`/`--prm`) is shown.

With `--prompts_file`, each line of the file is one question, answered in batches, and each
answer prints as a JSON object with `prompt`, `response` (the raw text) and `answer` (what the
verifier's parser read, or null); with `--samples=N` the response is the reranked pick.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags

from data.format import Dialogue, Turn, parse_assistant
from rl import chat
from rl.generate import generate
from train.workdir import load_run

chat.define_flags()
_PROMPT = flags.DEFINE_string("prompt", None, "One question to answer.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one question per line.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Questions per sampler batch.")


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a prompts file."""
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one question per line)")
    return prompts


def answer_file(run, questions: list[str], options: chat.ReplyOptions, rng) -> None:
    """Prints one JSON line per question: prompt, response, answer."""
    greedy = options.temperature <= 0
    generations = generate(
        run.params,
        run.model_cfg,
        run.tokenizer,
        questions,
        max_new_tokens=options.max_new_tokens,
        batch_size=min(flags.FLAGS.batch_size, len(questions)),
        num_samples=options.samples,
        greedy=greedy,
        temperature=options.temperature if not greedy else 1.0,
        top_k=options.top_k,
        top_p=options.top_p,
        rng=rng,
    )
    for question, samples in zip(questions, generations, strict=True):
        texts = [gen.text for gen in samples]
        index = chat.choose(question, texts, options)[0] if len(texts) > 1 else 0
        answer = parse_assistant(texts[index]).answer
        print(json.dumps({"prompt": question, "response": texts[index], "answer": answer}))


def main(argv):
    """Answers --prompt or every line of --prompts_file."""
    del argv
    if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
        raise app.UsageError("Give exactly one of --prompt or --prompts_file")
    options = chat.options_from_flags()
    rng = jax.random.PRNGKey(flags.FLAGS.seed)
    if _PROMPTS_FILE.value is not None:
        answer_file(load_run(flags.FLAGS.workdir), read_prompts(_PROMPTS_FILE.value), options, rng)
        return
    run = load_run(flags.FLAGS.workdir)
    question = Dialogue((Turn("user", _PROMPT.value),))
    chat.reply(run, question, options, redact=True, rng=rng, out=sys.stdout)


if __name__ == "__main__":
    app.run(main)
