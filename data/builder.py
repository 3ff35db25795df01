"""TFDS builder for the task mix: array_record splits of problems with their thinking traces.

Splits: `train`, `validation`, `test`, and `corrupted_train`/`corrupted_validation` (traces
with a known first wrong step, for the process reward model) when `corrupted_size > 0`.

Held-out problems never leak into training. Splits are drawn in the order test, validation,
train, and a problem is kept only if its canonical prompt (whitespace-normalized) was not
drawn before, so prompts are unique within a split and disjoint across splits. Each task
gets its share of a split by weight; a task short of its share after exclusion is topped up
with fresh draws, and one with too few distinct prompts stays short (with a warning) rather
than skew the mix. A GSM8K file, if given, joins the train split only. Everything is
deterministic in `seed`.

Records of corrupted traces keep the problem's `meta` (so verifiers still judge against the
true answer), while their `answer` and `response` carry the wrong value the trace reaches.

The builder config's name is a hash of the record-shaping fields of the data config (tasks,
sizes, seed, the GSM8K file's contents), so a changed config is built into a new folder
instead of reusing stale records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data import format as fmt
from data import tasks
from data.gsm8k import load_gsm8k
from data.tasks.base import Problem

SPLITS = ("train", "validation", "test")
CORRUPTED_SPLITS = ("corrupted_train", "corrupted_validation")
_SPLIT_IDS = {
    "train": 0,
    "validation": 1,
    "test": 2,
    "corrupted_train": 3,
    "corrupted_validation": 4,
}
_MAX_DRAW_ROUNDS = 8  # top-up rounds before accepting a split short of its size
# Fields of the data config that change the generated records.
_RECORD_FIELDS = ("train_size", "validation_size", "test_size", "corrupted_size", "seed")


@dataclasses.dataclass(eq=False)
class TasksConfig(tfds.core.BuilderConfig):
    """Builder config carrying the record-shaping part of the data config as canonical JSON."""

    spec: str = dataclasses.field(default="{}", repr=False)
    gsm8k_path: str = ""  # read at generation time; its content hash is part of `spec`


class ThinkaxTasks(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Synthesized reasoning problems with step traces (and corrupted traces)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Task mix with thinking traces; corrupted traces for the PRM."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks next to the code for download checksums; there are none, and the lookup
        # needs `importlib_resources`, a backport TFDS only installs for Python < 3.9.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # Built here (not from a metadata folder) since the builder lives outside a TFDS package.
        return tfds.core.DatasetInfo(builder=self, features=features())

    def _split_generators(self, dl_manager):
        spec = json.loads(self.builder_config.spec)
        splits = generate_splits(spec, self.builder_config.gsm8k_path)
        return {name: self._generate_examples(problems) for name, problems in splits.items()}

    def _generate_examples(self, problems: Sequence[Problem]):
        for i, problem in enumerate(problems):
            yield i, problem_to_record(problem)


def features() -> tfds.features.FeaturesDict:
    """The record schema; `response` is the full rendered assistant turn."""
    text = tfds.features.Text()
    return tfds.features.FeaturesDict(
        {
            "task": text,
            "prompt": text,
            "response": text,  # render_assistant: thinking block(s) plus the visible answer
            "answer": text,  # the value the trace reaches (a wrong one if corrupted)
            "headline": text,
            "steps": tfds.features.Sequence(text),
            "summary": text,
            "visible": text,  # the visible answer text alone (Problem.response)
            "first_error_step": np.int32,  # -1 if the trace is clean
            "meta": text,  # JSON
        }
    )


def make_builder(data_config: Mapping[str, Any], data_dir: str) -> ThinkaxTasks:
    """The builder for `data_config`, writing under `data_dir/thinkax_tasks/<hash>/<version>`."""
    spec = record_spec(data_config)
    spec_json = json.dumps(spec, sort_keys=True)
    name = "c" + hashlib.sha256(spec_json.encode()).hexdigest()[:16]
    config = TasksConfig(
        name=name,
        description=spec_json,
        spec=spec_json,
        gsm8k_path=os.path.abspath(data_config["gsm8k_path"]) if spec["gsm8k_sha256"] else "",
    )
    return ThinkaxTasks(config=config, data_dir=data_dir, file_format="array_record")


def record_spec(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of the data config that shape the records, as plain JSON-able values."""
    spec = {key: int(data_config[key]) for key in _RECORD_FIELDS}
    spec["tasks"] = _task_mix(data_config["tasks"])
    if not spec["tasks"]:
        raise ValueError("data.tasks is empty: give at least one task with a positive weight")
    path = data_config.get("gsm8k_path", "") or ""
    if path and not os.path.isfile(path):
        raise ValueError(f"data.gsm8k_path={path!r} is not a file")
    spec["gsm8k_sha256"] = _file_sha256(path) if path else ""
    return spec


def generate_splits(spec: Mapping[str, Any], gsm8k_path: str = "") -> dict[str, list[Problem]]:
    """All splits' problems for a `record_spec`: held-out splits first, train excludes them."""
    mix, seed = spec["tasks"], spec["seed"]
    taken: set[str] = set()
    splits = {}
    for split in ("test", "validation"):
        splits[split] = _draw_split(mix, spec[f"{split}_size"], seed, split, taken)
    gsm8k = load_gsm8k(gsm8k_path) if gsm8k_path else []
    splits["train"] = _draw_split(mix, spec["train_size"], seed, "train", taken)
    splits["train"] += _keep_unique(gsm8k, taken)
    if spec["corrupted_size"] > 0:
        n_train = spec["corrupted_size"]
        # As many per validation problem as per train problem, at most corrupted_size.
        n_val = min(
            n_train, math.ceil(n_train * spec["validation_size"] / max(spec["train_size"], 1))
        )
        splits["corrupted_train"] = corrupt_problems(
            splits["train"], n_train, seed, _SPLIT_IDS["corrupted_train"]
        )
        splits["corrupted_validation"] = corrupt_problems(
            splits["validation"], n_val, seed, _SPLIT_IDS["corrupted_validation"]
        )
    return {name: splits[name] for name in (*SPLITS, *CORRUPTED_SPLITS) if name in splits}


def corrupt_problems(problems: Sequence[Problem], n: int, seed: int, stream: int) -> list[Problem]:
    """Up to `n` distinct corrupted traces, cycling through `problems` in a seeded order.

    Each has one mistake at a step drawn uniformly from the steps where a mistake changes
    the answer. Stops short of `n` once a whole cycle yields nothing new.
    """
    candidates = [p for p in problems if p.task in tasks.TASKS and p.steps]
    rng = np.random.default_rng([seed, stream])
    order = rng.permutation(len(candidates))
    out: list[Problem] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    tried, misses = 0, 0  # misses: consecutive tries that gave nothing new
    while len(out) < n and misses < len(candidates):
        corrupted = _corrupt_somewhere(candidates[order[tried % len(candidates)]], rng)
        tried += 1
        if corrupted is None or (corrupted.prompt, corrupted.steps) in seen:
            misses += 1
            continue
        seen.add((corrupted.prompt, corrupted.steps))
        out.append(corrupted)
        misses = 0
    return out


def _corrupt_somewhere(problem: Problem, rng: np.random.Generator) -> Problem | None:
    """The problem with a mistake at a random step that admits one; None if no step does."""
    family = tasks.get_task(problem.task)
    for step in rng.permutation(len(problem.steps)):
        try:
            return family.corrupt(problem, int(step), rng)
        except ValueError:  # documented: no mistake at this step changes the answer
            continue
    return None


def canonical_prompt(prompt: str) -> str:
    """The key two prompts are compared by: whitespace runs collapsed, ends stripped."""
    return " ".join(prompt.split())


def problem_to_record(problem: Problem) -> dict[str, Any]:
    """A Problem as a TFDS record (see `features`)."""
    dialogue = fmt.problem_to_dialogue(problem)
    return {
        "task": problem.task,
        "prompt": problem.prompt,
        "response": fmt.render_assistant(dialogue.turns[-1]),
        "answer": problem.answer,
        "headline": problem.headline,
        "steps": list(problem.steps),
        "summary": problem.summary,
        "visible": problem.response,
        "first_error_step": problem.first_error_step,
        "meta": json.dumps(problem.meta, sort_keys=True),
    }


def record_to_problem(record: Mapping[str, Any]) -> Problem:
    """Rebuilds the Problem of a decoded record (the inverse of `problem_to_record`)."""
    return Problem(
        task=record["task"],
        prompt=record["prompt"],
        answer=record["answer"],
        headline=record["headline"],
        steps=tuple(record["steps"]),
        summary=record["summary"],
        response=record["visible"],
        first_error_step=int(record["first_error_step"]),
        meta=json.loads(record["meta"]),
    )


class DecodedSource:
    """A random-access source whose records have str fields (TFDS returns bytes)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"DecodedSource({self._source!r})"


def load_split(data_dir_or_builder: str | tfds.core.DatasetBuilder, split: str) -> DecodedSource:
    """Random access to a prepared split, by builder or by its versioned data folder."""
    builder = data_dir_or_builder
    if not isinstance(builder, tfds.core.DatasetBuilder):
        if not os.path.isfile(os.path.join(builder, "dataset_info.json")):
            raise ValueError(
                f"{builder!r} is not a prepared dataset folder (no dataset_info.json); pass "
                "the builder or its `builder.data_dir` (see data.build.prepare)"
            )
        builder = tfds.builder_from_directory(builder)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)}")
    return DecodedSource(builder.as_data_source(split=split))


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """bytes -> str, byte arrays -> list[str], numpy scalars -> int."""
    return {key: _decode_value(value) for key, value in record.items()}


def task_counts(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
    """Number of records per task, per split, of a prepared builder."""
    counts = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        split_counts: dict[str, int] = {}
        for i in range(len(source)):
            task = _decode_value(source[i]["task"])
            split_counts[task] = split_counts.get(task, 0) + 1
        counts[split] = dict(sorted(split_counts.items()))
    return counts


def _draw_split(
    mix: Mapping[str, Any], n: int, seed: int, split: str, taken: set[str]
) -> list[Problem]:
    """`n` problems in the mix's proportions, prompts new to `taken` (which is updated)."""
    counts = tasks.task_counts({name: entry["weight"] for name, entry in mix.items()}, n)
    problems = []
    for name in sorted(mix):
        problems += _draw_unique(name, mix[name], counts[name], seed, split, taken)
    # Mixed, so that any prefix of a split (e.g. the first n eval records) spans the tasks.
    order = np.random.default_rng([seed, _SPLIT_IDS[split]]).permutation(len(problems))
    return [problems[i] for i in order]


def _draw_unique(
    name: str, entry: Mapping[str, Any], n: int, seed: int, split: str, taken: set[str]
) -> list[Problem]:
    """`n` problems of one task whose prompts are new to `taken` (which is updated)."""
    out: list[Problem] = []
    for round_index in range(_MAX_DRAW_ROUNDS):
        need = n - len(out)
        if need <= 0:
            break
        draw_seed = _derived_seed(seed, _SPLIT_IDS[split], round_index)
        # Later rounds ask for more than is missing, since many draws may be duplicates.
        drawn = tasks.generate_problems({name: entry}, need * (1 + round_index), draw_seed, split)
        out += _keep_unique(drawn, taken, limit=need)
    if len(out) < n:
        logging.warning(
            "Split %s has %d distinct %s problems, fewer than the %d asked for: raise the "
            "task's difficulty knobs, lower its weight or the split size.",
            split,
            len(out),
            name,
            n,
        )
    return out


def _keep_unique(
    problems: Sequence[Problem], taken: set[str], limit: int | None = None
) -> list[Problem]:
    """Up to `limit` problems whose canonical prompt is new; adds their prompts to `taken`."""
    out = []
    for problem in problems:
        if limit is not None and len(out) >= limit:
            break
        key = canonical_prompt(problem.prompt)
        if key not in taken:
            taken.add(key)
            out.append(problem)
    return out


def _task_mix(task_config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The task mix as plain sorted dicts, without zero-weight tasks."""
    plain = task_config.to_dict() if hasattr(task_config, "to_dict") else dict(task_config)
    mix = {}
    for name, entry in sorted(plain.items()):
        weight = float(entry.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"data.tasks.{name}.weight must be >= 0, got {weight}")
        if weight > 0:
            mix[name] = {"weight": weight, "knobs": dict(entry.get("knobs", {}) or {})}
    return mix


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers, so that streams never overlap by accident."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _file_sha256(path: str) -> str:
    """Hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _decode_value(value: Any) -> Any:
    """One field of a raw TFDS record as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return _decode_value(value.item())
        return [_decode_value(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_decode_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
