"""Answer questions with a trained run.

    python -m rl.sample --workdir=DIR --prompt="What is 482 * 37?"
    python -m rl.sample --workdir=DIR --prompts_file=questions.txt   # one JSON line each

Greedy by default; `--temperature` > 0 samples instead. With `--prompts_file`, each line of
the file is one question, answered in batches, and each answer prints as a JSON object with
`prompt`, `response` (the raw text) and `answer` (what the verifier's parser read, or null).
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

from data.format import parse_assistant
from rl.generate import generate
from train.workdir import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.main workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "One question to answer.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one question per line.")
_RAW = flags.DEFINE_bool("raw", False, "Print the raw response text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 384, "Tokens to generate at most.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Questions per sampler batch.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 decodes greedily.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a prompts file."""
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one question per line)")
    return prompts


def main(argv):
    """Answers --prompt or every line of --prompts_file."""
    del argv
    if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
        raise app.UsageError("Give exactly one of --prompt or --prompts_file")
    questions = [_PROMPT.value] if _PROMPT.value is not None else read_prompts(_PROMPTS_FILE.value)
    run = load_run(_WORKDIR.value)
    greedy = _TEMPERATURE.value <= 0
    generations = generate(
        run.params,
        run.model_cfg,
        run.tokenizer,
        questions,
        max_new_tokens=_MAX_NEW.value,
        batch_size=min(_BATCH.value, len(questions)),
        greedy=greedy,
        temperature=_TEMPERATURE.value if not greedy else 1.0,
        rng=jax.random.PRNGKey(_SEED.value),
    )
    for question, (gen,) in zip(questions, generations, strict=True):
        answer = parse_assistant(gen.text).answer
        if _PROMPTS_FILE.value is not None:
            print(json.dumps({"prompt": question, "response": gen.text, "answer": answer}))
        else:
            print(gen.text)


if __name__ == "__main__":
    app.run(main)
