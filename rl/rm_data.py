"""Reward-model training data: SFT samples labelled by verifiers, step checkers and rollouts.

For each of the first `rm_data.num_problems` train problems, the SFT policy (`init_from`)
samples `samples_per_problem` responses at `temperature`. Each response gets

  an outcome label (ORM): the task verifier's verdict on its visible answer;
  step labels (PRM), one per thought step and, for a finished response, one for the answer
  step at its <|eot_id|> (rl.reward_model.prm_positions), from `rm_data.label_source`:
    "exact"  the task's step checker finds the first wrong step k: steps before k are 1,
             step k is 0, later steps (the answer step too) are unlabelled (Let's Verify).
             If every step checks out, the answer step is 1 when the trace is complete and
             the answer right, else 0: a trace that stops early, or whose answer line does
             not follow from its steps, is wrong where it turns to the answer. (A response
             cut off before its answer has no answer step; its last step takes the 0.)
    "mc"     Math-Shepherd: `mc_rollouts` completions from the response cut after each
             step's "\\n"; hard label = any completion verified correct, soft value = the
             fraction that are. The answer step's value is the response's own outcome.
    "both"   a step is good if it checks out and some rollout from it succeeds: the exact
             label times the MC label (soft: times the success rate); exact's mask.

Synthetic pairs join them: the first `corrupted_share * samples` traces of the
`corrupted_train` split (one injected mistake at a known step, exact labels) and the clean
trace of each one's problem. The held-out split "validation" is built the same way from
the validation problems and `corrupted_validation`.

`prepare_rm_data` builds all of it once into the workdir's TFDS folder (data.rm_builder),
keyed by a hash of the rm_data config, the task data and the policy checkpoint.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from data import builder as builder_lib
from data import format as fmt
from data import rm_builder
from data.tasks import TASKS, get_task, verify
from data.tasks.base import Problem
from rl.generate import user_prompt_tokens
from rl.reward_model import prm_positions, step_end_positions

LABEL_SOURCES = ("exact", "mc", "both")
RM_SPLITS = {
    "train": ("train", "corrupted_train"),
    "validation": ("validation", "corrupted_validation"),
}
_READ_TIME_FIELDS = ("soft_targets",)  # rm_data fields that do not change the records
# rm_data fields the spec holds elsewhere (its "policy_step": the checkpoint actually used).
_SPEC_FIELDS = ("policy_step",)
MIN_PROMPT_WIDTH = 64  # tokens; task prompts are shorter

# (prompts, num_samples, max_new_tokens, stream) -> per prompt, num_samples token arrays,
# each ending with <|eot_id|> if the sample finished.
SampleFn = Callable[[Sequence[Sequence[int]], int, int, int], list[list[np.ndarray]]]


def make_sample_fn(
    params,
    model_cfg,
    tokenizer,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> SampleFn:
    """A SampleFn drawing from a policy in fixed-size batches (one compile per prompt bucket)."""
    from rich.progress import track

    from model import sampler

    def sample_fn(prompts, num_samples, max_new_tokens, stream):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
        out: list[list[np.ndarray]] = []
        starts = range(0, len(prompts), batch_size)
        label = f"sampling {len(prompts)} x {num_samples}"
        for start in track(starts, description=label, disable=not progress, transient=True):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one compiled batch shape
            # At least MIN_PROMPT_WIDTH wide, so all short prompts share one compiled program.
            lengths_B = np.asarray([len(p) for p in padded], np.int32)
            tokens_BxP = np.full((batch_size, max(MIN_PROMPT_WIDTH, lengths_B.max())),
                                 tokenizer.pad_id, np.int32)  # fmt: skip
            for b, prompt in enumerate(padded):
                tokens_BxP[b, : len(prompt)] = prompt
            result = sampler.sample(
                params,
                model_cfg,
                (tokens_BxP, lengths_B),
                rng=jax.random.fold_in(rng, start),
                max_new_tokens=max_new_tokens,
                stop_tokens=(tokenizer.eot_id,),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                pad_id=tokenizer.pad_id,
                num_samples=num_samples,
            )
            tokens_BxNxT = np.asarray(result.tokens_BxNxT)
            lengths_BxN = np.asarray(result.lengths_BxN)
            for b in range(len(chunk)):
                out.append([tokens_BxNxT[b, n, : lengths_BxN[b, n]] for n in range(num_samples)])
        return out

    return sample_fn


# ---------------------------------------------------------------------------- labels


def outcome(problem: Problem, response_text: str) -> float:
    """The verifier's verdict on a response's visible answer (1.0 right, 0.0 wrong)."""
    parsed = fmt.parse_assistant(response_text)
    return float(verify(problem, parsed.turn.content or response_text))


def response_steps(response_tokens, tokenizer) -> tuple[np.ndarray, list[str]]:
    """Step-end indices in the response and each step's text (the tokens since the step began)."""
    tokens_T = np.asarray(response_tokens, np.int64).reshape(-1)
    ends_S = step_end_positions(tokens_T, tokenizer)
    thoughts_id = tokenizer.token_id(fmt.THOUGHTS)
    texts, previous_end = [], -1
    for end in ends_S:
        opened = np.flatnonzero(tokens_T[:end] == thoughts_id)
        start = max(previous_end, int(opened[-1]) if opened.size else -1) + 1
        texts.append(tokenizer.decode(tokens_T[start:end]))
        previous_end = int(end)
    return ends_S, texts


def process_labels(num_steps: int, first_error: int, correct: bool, finished: bool):
    """(labels, mask) float32 [S + finished]: the thought steps', then the answer step's.

    `first_error` is the step checker's: the first wrong step, -1 if none, or `num_steps`
    if the trace stops before the steps are done (a missing step).
    """
    labels_S = np.ones((num_steps + finished,), np.float32)
    mask_S = np.ones((num_steps + finished,), np.float32)
    if 0 <= first_error < num_steps:
        labels_S[first_error] = 0.0
        mask_S[first_error + 1 :] = 0.0
    elif finished:
        labels_S[-1] = float(correct and first_error < 0)
    elif not correct and num_steps:
        labels_S[-1] = 0.0  # cut off before its answer: the last step written takes it
    return labels_S, mask_S


def exact_labels(problem: Problem, step_texts: Sequence[str], correct: bool, finished: bool):
    """(labels, mask) [S + finished] from the task's step checker (see `process_labels`).

    A task without a step checker (GSM8K) labels only the answer step, with the outcome.
    """
    num_steps = len(step_texts)
    if problem.task not in TASKS:
        labels_S, mask_S = process_labels(num_steps, -1, correct, finished)
        mask_S[:num_steps] = 0.0
        return labels_S, mask_S
    first_error = get_task(problem.task).check_steps(problem, tuple(step_texts))
    return process_labels(num_steps, first_error, correct, finished)


def combine_labels(exact_S, exact_mask_S, mc_S, label_source: str):
    """(labels, values, mask) [S] of one response for `label_source`; mc_S is NaN where unknown."""
    if label_source == "exact":
        return exact_S, exact_S, exact_mask_S
    known_S = (~np.isnan(mc_S)).astype(np.float32)
    values_S = np.nan_to_num(mc_S).astype(np.float32)
    hard_S = (values_S > 0).astype(np.float32)
    if label_source == "mc":
        return hard_S, values_S, known_S
    if label_source == "both":
        return exact_S * hard_S, exact_S * values_S, exact_mask_S * known_S
    raise ValueError(f"rm_data.label_source must be one of {LABEL_SOURCES}, got {label_source!r}")


def response_text(response_tokens, tokenizer) -> str:
    """The text of a response's tokens, without the closing <|eot_id|>."""
    return tokenizer.decode(_strip(response_tokens, tokenizer))


def make_record(problem, source, prompt, response, tokenizer, *, orm, labels, values, mask):
    """A data.rm_builder record of one response and its labels."""
    response_T = np.asarray(response, np.int32)
    return {
        "task": problem.task,
        "prompt": problem.prompt,
        "response": response_text(response_T, tokenizer),
        "source": source,
        "tokens": np.concatenate([np.asarray(prompt, np.int32), response_T]),
        "prompt_length": len(prompt),
        "step_positions": len(prompt) + prm_positions(response_T, tokenizer),
        "orm_label": np.float32(orm),
        "step_labels": np.asarray(labels, np.float32),
        "step_values": np.asarray(values, np.float32),
        "step_mask": np.asarray(mask, np.float32),
    }


def label_response(problem: Problem, prompt, response, tokenizer) -> dict:
    """A sampled response's record, with its ORM label and exact step labels."""
    _, texts = response_steps(response, tokenizer)
    correct = outcome(problem, response_text(response, tokenizer))
    labels_S, mask_S = exact_labels(problem, texts, correct > 0, is_finished(response, tokenizer))
    return make_record(
        problem, "policy", prompt, response, tokenizer,
        orm=correct, labels=labels_S, values=labels_S, mask=mask_S,
    )  # fmt: skip


def mc_step_values(
    problems: Sequence[Problem],
    records: Sequence[Mapping[str, Any]],
    sample_fn: SampleFn,
    tokenizer,
    *,
    rollouts: int,
    max_new_tokens: int,
    max_len: int,
    stream: int,
) -> list[np.ndarray]:
    """Per record, the fraction of `rollouts` completions from each step end that verify
    correct ([S], NaN where the prefix plus `max_new_tokens` exceeds `max_len`)."""
    prefixes, owners = [], []
    values = [np.full((len(r["step_positions"]),), np.nan, np.float32) for r in records]
    for i, record in enumerate(records):
        for s, end in enumerate(record["step_positions"]):
            if end == len(record["tokens"]) - 1 and is_finished(record["tokens"], tokenizer):
                values[i][s] = record["orm_label"]  # the answer step: nothing left to sample
            elif end + 1 + max_new_tokens <= max_len:
                prefixes.append(record["tokens"][: end + 1])
                owners.append((i, s))
    if not prefixes:
        return values
    completions = sample_fn(prefixes, rollouts, max_new_tokens, stream)
    for (i, s), prefix, samples in zip(owners, prefixes, completions, strict=True):
        start = records[i]["prompt_length"]
        wins = [
            outcome(
                problems[i],
                tokenizer.decode(np.concatenate([prefix[start:], _strip(c, tokenizer)])),
            )
            for c in samples
        ]
        values[i][s] = np.mean(wins)
    return values


def is_finished(tokens, tokenizer) -> bool:
    """Whether a response's tokens end with <|eot_id|> (it was not cut off)."""
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    return bool(tokens.size and tokens[-1] == tokenizer.eot_id)


def _strip(tokens, tokenizer) -> np.ndarray:
    """Tokens without a final <|eot_id|>."""
    tokens = np.asarray(tokens, np.int32)
    return tokens[:-1] if tokens.size and tokens[-1] == tokenizer.eot_id else tokens


def policy_records(problems, sample_fn: SampleFn, tokenizer, rm_cfg, *, max_len: int, stream: int):
    """Sampled responses to `problems`, labelled as `rm_cfg.label_source` says."""
    prompts = [user_prompt_tokens(tokenizer, p.prompt) for p in problems]
    n = rm_cfg.samples_per_problem
    samples = sample_fn(prompts, n, rm_cfg.max_new_tokens, stream)
    owners = [p for p in problems for _ in range(n)]
    records = [
        label_response(problem, prompt, response, tokenizer)
        for problem, prompt, responses in zip(problems, prompts, samples, strict=True)
        for response in responses
    ]
    if rm_cfg.label_source == "exact":
        return records
    mc = mc_step_values(
        owners,
        records,
        sample_fn,
        tokenizer,
        rollouts=rm_cfg.mc_rollouts,
        max_new_tokens=rm_cfg.max_new_tokens,
        max_len=max_len,
        stream=stream + 1,
    )
    out = []
    for record, mc_S in zip(records, mc, strict=True):
        labels, values, mask = combine_labels(
            record["step_labels"], record["step_mask"], mc_S, rm_cfg.label_source
        )
        out.append({**record, "step_labels": labels, "step_values": values, "step_mask": mask})
    return out


def trace_record(problem: Problem, tokenizer, source: str) -> dict:
    """A record of a written trace (clean or corrupted), labelled from its first wrong step."""
    prompt = user_prompt_tokens(tokenizer, problem.prompt)
    tokens = fmt.encode_dialogue(fmt.problem_to_dialogue(problem), tokenizer).tokens
    if list(tokens[: len(prompt)]) != prompt:
        raise ValueError(f"the dialogue of {problem.prompt!r} does not start with its prompt")
    response = tokens[len(prompt) :]
    correct = outcome(problem, problem.response)
    num_steps = len(step_end_positions(response, tokenizer))
    labels_S, mask_S = process_labels(
        num_steps, problem.first_error_step, correct > 0, is_finished(response, tokenizer)
    )
    return make_record(
        problem, source, prompt, response, tokenizer,
        orm=correct, labels=labels_S, values=labels_S, mask=mask_S,
    )  # fmt: skip


def corrupted_pairs(corrupted: Sequence[Problem], clean_split, tokenizer) -> list[dict]:
    """Records of corrupted traces, each followed by the clean trace of its problem."""
    wanted = {p.prompt for p in corrupted}
    clean = {}
    for i in range(len(clean_split)):
        record = clean_split[i]
        if record["prompt"] in wanted:
            clean[record["prompt"]] = builder_lib.record_to_problem(record)
    out = []
    for problem in corrupted:
        out.append(trace_record(problem, tokenizer, "corrupted"))
        if problem.prompt in clean:
            out.append(trace_record(clean[problem.prompt], tokenizer, "clean"))
    return out


# ---------------------------------------------------------------------------- the dataset


def policy_dir(config) -> str:
    """The SFT workdir the RM data samples from (`config.init_from`), checked."""
    path = config.init_from
    if not path or not (epath.Path(path) / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"init_from={path!r} is not an SFT workdir with checkpoints/. Reward-model data is "
            "sampled from an SFT run: train one (python -m train.main --config=sft.py "
            "--workdir=workdirs/sft) or pass --config.init_from=<sft workdir>"
        )
    return path


def sampling_step(config) -> int | None:
    """The checkpoint of `init_from` that samples the data: `rm_data.policy_step`, else the
    one the reward model starts from (`init_from_step`); None for the newest."""
    return config.rm_data.get("policy_step", 0) or config.init_from_step or None


def rm_spec(config, policy: str) -> dict:
    """Everything that shapes the RM records: rm_data, the task data, the policy checkpoint."""
    from train.checkpoint import latest_step

    skip = _READ_TIME_FIELDS + _SPEC_FIELDS
    rm = {k: v for k, v in config.rm_data.to_dict().items() if k not in skip}
    if rm["label_source"] not in LABEL_SOURCES:
        raise ValueError(
            f"rm_data.label_source must be one of {LABEL_SOURCES}, got {rm['label_source']!r}"
        )
    return {
        "rm_data": rm,
        "data": builder_lib.record_spec(config.data),
        "policy": policy,
        "policy_step": sampling_step(config) or latest_step(policy),
    }


def generate_splits(config, prepared, policy: str) -> dict[str, list[dict]]:
    """The RM "train" and "validation" records (samples the policy; minutes on a CPU)."""
    from train.workdir import load_run

    run = load_run(policy, step=sampling_step(config))
    rm_cfg, tokenizer = config.rm_data, prepared.tokenizer
    sample_fn = make_sample_fn(
        run.params,
        run.model_cfg,
        tokenizer,
        temperature=rm_cfg.temperature,
        top_k=rm_cfg.top_k,
        top_p=rm_cfg.top_p,
        batch_size=rm_cfg.batch_size,
        seed=rm_cfg.seed,
        progress=config.progress_bar,
    )
    num_problems = {"train": rm_cfg.num_problems, "validation": rm_cfg.eval_problems}
    splits = {}
    for index, (name, (split, corrupted_split)) in enumerate(RM_SPLITS.items()):
        source = builder_lib.load_split(prepared.builder, split)
        problems = [
            builder_lib.record_to_problem(source[i])
            for i in range(min(num_problems[name], len(source)))
        ]
        records = policy_records(
            problems,
            sample_fn,
            tokenizer,
            rm_cfg,
            max_len=run.model_cfg.max_seq_len,
            stream=10 * index,
        )
        num_corrupted = round(rm_cfg.corrupted_share * len(records))
        if num_corrupted and corrupted_split in prepared.builder.info.splits:
            corrupted = builder_lib.load_split(prepared.builder, corrupted_split)
            chosen = [
                builder_lib.record_to_problem(corrupted[i])
                for i in range(min(num_corrupted, len(corrupted)))
            ]
            records += corrupted_pairs(chosen, source, tokenizer)
        elif num_corrupted:
            logging.warning(
                "No %s split (data.corrupted_size=0): no corrupted traces.", corrupted_split
            )
        logging.info("Reward data %s: %s", name, summarize(records))
        splits[name] = records
    return splits


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Counts and label rates of a list of records, for logs."""
    steps = np.concatenate([np.asarray(r["step_labels"]) for r in records] or [np.zeros(0)])
    mask = np.concatenate([np.asarray(r["step_mask"]) for r in records] or [np.zeros(0)])
    return {
        "records": len(records),
        **{source: sum(r["source"] == source for r in records) for source in rm_builder.SOURCES},
        "orm_positive_rate": float(np.mean([r["orm_label"] for r in records])) if records else 0.0,
        "labelled_steps": int(mask.sum()),
        "step_positive_rate": float((steps * mask).sum() / max(mask.sum(), 1.0)),
    }


def prepare_rm_data(config, prepared):
    """The RM data builder for this run, built first if missing (process 0 builds it)."""
    policy = policy_dir(config)
    spec = rm_spec(config, policy)
    # data.build puts the task data at <workdir>/data/thinkax_tasks/<hash>/<version>; the
    # reward data goes next to it, in the same TFDS data folder.
    data_root = os.path.dirname(os.path.dirname(os.path.dirname(prepared.data_dir)))
    make_splits = functools.partial(generate_splits, config, prepared, policy)
    builder = rm_builder.make_rm_builder(spec, data_root, make_splits)
    if jax.process_index() == 0:
        _build(builder)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rm_data")
        # A host whose data folder is its own (a remote workdir's local cache) builds its
        # own copy; sampling is seeded, so every copy is the same.
        _build(rm_builder.make_rm_builder(spec, data_root, make_splits))
    return rm_builder.make_rm_builder(spec, data_root)


def _build(builder) -> None:
    """Writes the builder's splits unless they are there already."""
    if rm_builder.is_prepared(builder):
        return
    import tensorflow_datasets as tfds

    logging.info("Building reward data into %s", builder.data_dir)
    tfds.display_progress_bar(False)
    builder.download_and_prepare()


def load_rm_split(config, prepared, split: str):
    """Random access to one split ("train" or "validation") of the run's RM data."""
    return builder_lib.load_split(prepare_rm_data(config, prepared), split)
