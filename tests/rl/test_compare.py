"""The before/after problems: eval.num_problems of eval.split (0: all), topped up with fresh
held-out ones to rl.compare.num_problems, and as many harder."""

from __future__ import annotations

import numpy as np
import pytest

from data.builder import canonical_prompt, load_split
from rl import compare
from train.configs import rl as rl_configs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from data.build import prepare

    config = rl_configs.get_config("tiny")
    config.data.train_size, config.data.validation_size, config.data.test_size = 16, 2, 5
    return config, prepare(config.data, str(tmp_path_factory.mktemp("data")), verbose=False)


def levels_for(prepared, total=0, **eval_overrides):
    config, data = prepared
    config = config.copy_and_resolve_references()
    config.eval.update(eval_overrides)
    return compare.held_out_levels(config, data, total)


def test_zero_problems_means_the_whole_split(prepared):
    levels = levels_for(prepared, split="test", num_problems=0)
    test = load_split(prepared[1].builder, "test")
    assert [p.prompt for p in levels[compare.TRAIN_LEVEL]] == [
        test[i]["prompt"] for i in range(len(test))
    ]
    assert len(levels[compare.HARDER_LEVEL]) == len(test) == 5


def test_a_count_takes_the_first_problems_of_the_split(prepared):
    levels = levels_for(prepared, split="validation", num_problems=1)
    validation = load_split(prepared[1].builder, "validation")
    assert [p.prompt for p in levels[compare.TRAIN_LEVEL]] == [validation[0]["prompt"]]
    assert len(levels[compare.HARDER_LEVEL]) == 1
    # More than the split holds: the whole split.
    assert len(levels_for(prepared, split="validation", num_problems=9)[compare.TRAIN_LEVEL]) == 2


def test_a_larger_count_tops_up_with_fresh_unseen_problems_of_the_mix(prepared):
    config, data = prepared
    base = levels_for(prepared, split="test", num_problems=0)[compare.TRAIN_LEVEL]
    levels = levels_for(prepared, 12, split="test", num_problems=0)
    level = levels[compare.TRAIN_LEVEL]
    assert len(level) == 12 and len(levels[compare.HARDER_LEVEL]) == 12
    assert [p.prompt for p in level[: len(base)]] == [p.prompt for p in base]
    prompts = [canonical_prompt(p.prompt) for p in level + levels[compare.HARDER_LEVEL]]
    assert len(set(prompts)) == len(prompts)  # nothing drawn twice, across levels too
    train = load_split(data.builder, "train")
    seen = {canonical_prompt(train[i]["prompt"]) for i in range(len(train))}
    assert not seen & set(prompts)
    ((task, entry),) = config.data.tasks.items()
    low, high = entry["knobs"]["length"]  # rl.py trains on letter counting
    assert all(p.task == task and low <= len(p.meta["word"]) <= high for p in level)
    # The same count draws the same problems (every run of a comparison scores the same ones).
    again = levels_for(prepared, 12, split="test", num_problems=0)[compare.TRAIN_LEVEL]
    assert [p.prompt for p in again] == [p.prompt for p in level]


def test_harder_problems_are_harder_and_unseen_in_training(prepared):
    config, data = prepared
    levels = levels_for(prepared, num_problems=0)
    train = load_split(data.builder, "train")
    seen = {canonical_prompt(train[i]["prompt"]) for i in range(len(train))}
    harder = levels[compare.HARDER_LEVEL]
    assert not seen & {canonical_prompt(p.prompt) for p in harder}
    low, _ = config.rl.compare.harder_knobs["length"]
    assert low > config.data.tasks[config.rl.compare.harder_task]["knobs"]["length"][1]
    assert all(p.task == config.rl.compare.harder_task for p in harder)
    assert all(len(p.meta["word"]) >= low for p in harder)


def test_an_empty_split_is_a_clear_error(prepared, monkeypatch):
    monkeypatch.setattr(compare, "load_split", lambda builder, split: [])
    with pytest.raises(ValueError, match="data.validation_size"):
        levels_for(prepared, split="validation")


def _run(config):
    import types

    return types.SimpleNamespace(config=config)


def test_runs_compared_together_must_share_the_sft_policy_and_eval_set(prepared):
    config = prepared[0]
    same = config.copy_and_resolve_references()
    same.objective, same.optimizer.lr = "dpo", 1.0  # algorithm settings may differ
    compare._same_start([_run(config), _run(same)])
    other = config.copy_and_resolve_references()
    other.init_from = "/elsewhere/sft"
    with pytest.raises(ValueError, match="init_from"):
        compare._same_start([_run(config), _run(other)])
    more = config.copy_and_resolve_references()
    more.rl.compare.num_problems, more.rl.compare.table = 512, False  # the table's own settings
    compare._same_start([_run(config), _run(more)])
    harder = config.copy_and_resolve_references()
    harder.rl.compare.harder_knobs = {"length": (17, 18)}
    with pytest.raises(ValueError, match="rl.compare"):
        compare._same_start([_run(config), _run(harder)])


def test_pass_at_n_samples_only_the_first_sample_problems(prepared, monkeypatch):
    import types

    config = prepared[0].copy_and_resolve_references()
    config.rl.compare.num_samples, config.rl.compare.sample_problems = 2, 3
    problems = levels_for(prepared, 10, split="test", num_problems=0)[compare.TRAIN_LEVEL]
    calls = []

    def fake_generate(params, model_cfg, tokenizer, questions, greedy, num_samples=1, **kw):
        calls.append((greedy, list(questions)))
        return [[types.SimpleNamespace(text=q)] * num_samples for q in questions]

    monkeypatch.setattr(compare, "generate", fake_generate)
    # "Correct" when the question's word has an even length: a known answer per problem.
    monkeypatch.setattr(
        compare, "verify_response", lambda p, text: float(len(p.meta["word"]) % 2 == 0)
    )
    scores = compare.policy_scores(None, None, None, problems, config)
    assert [(greedy, len(qs)) for greedy, qs in calls] == [(True, 10), (False, 3)]
    assert calls[1][1] == [p.prompt for p in problems[:3]]
    even = [float(len(p.meta["word"]) % 2 == 0) for p in problems]
    assert scores["greedy"] == pytest.approx(np.mean(even))
    assert scores["pass@1"] == pytest.approx(np.mean(even[:3]))
    assert scores["pass@2"] == pytest.approx(np.mean(even[:3]))


def test_table_has_one_row_per_level_and_policy_with_long_names():
    scores = {"greedy": 0.5, "pass@8": 0.75}
    table = {"train difficulty": {"SFT": scores, "expert_iteration": scores}, "harder": {}}
    lines = compare.format_table(table).splitlines()
    assert len(lines) == 3 and "expert_iteration" in lines[2]
    assert lines[1].index("0.500") == lines[2].index("0.500")  # columns stay aligned
