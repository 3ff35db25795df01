"""PRM-guided beam search: it follows the PRM, counts its tokens, its forked caches are exact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import sampler
from model.transformer import Transformer
from rl import search_beam
from rl.search_beam import (
    BeamConfig,
    PrmScorer,
    SearchTokens,
    WholeSequencePrmScorer,
    prm_scorer,
)

# Token ids of a made-up vocabulary inside the tiny preset's 128 (all below d_model = 32, so
# the bigram model below can give each its own embedding direction).
PAD, THOUGHTS, A, B, NL, EOT = 0, 10, 11, 12, 13, 14
IDS = SearchTokens(newline=NL, eot=EOT, pad=PAD, thoughts=THOUGHTS, closers=(15, 16, 17, 18))
PREFER_A, PREFER_B = 5, 6  # first prompt token: which step token the fake PRM likes
PROMPTS = [[PREFER_A, 7, THOUGHTS], [PREFER_B, THOUGHTS], [PREFER_A, THOUGHTS]]
# One search shape for every test, so the compiled decoder is shared.
CONFIG = BeamConfig(beam_width=2, num_candidates=3, max_new_tokens=24, max_step_tokens=4)


@pytest.fixture(scope="module")
def bigram_params(tiny_cfg, tiny_params):
    """A tiny model whose next token depends only on the current one.

    Zero output projections make every block the identity, so the final hidden state is the
    normed one-hot embedding of the current token and lm_head row t holds its next-token logits:
    a thoughts marker or "\\n" go on to step token A or B (or, after "\\n", to <|eot_id|>), and
    A and B go on to "\\n". Every step is one token and a newline.
    """
    params = tiny_params
    D, V = tiny_cfg.d_model, tiny_cfg.vocab_size
    layers = jax.tree.map(jnp.zeros_like, params["layers"])
    embedding = np.zeros((V, D), np.float32)
    embedding[np.arange(V), np.arange(V) % D] = 1.0
    table = np.full((D, V), -30.0, np.float32)
    for token in range(D):
        table[token, [A, B]] = 0.0
    table[[A, B], :] = -30.0
    table[[A, B], NL] = 0.0
    table[NL, EOT] = 0.0
    # RMSNorm scales a one-hot vector by sqrt(D).
    return {
        **params,
        "layers": layers,
        "embed": {"embedding": jnp.asarray(embedding)},
        "final_norm": {"scale": jnp.ones((D,))},
        "lm_head": {"kernel": jnp.asarray(table / np.sqrt(D))},
    }


@dataclasses.dataclass(frozen=True)
class FakePrm:
    """Step logit +2 when the step holds the favored token (A or B per prompt), else -2; the
    answer step (<|eot_id|>) always +2."""

    def start(self, tokens_BxP, lengths_B, max_len):
        favored_B = np.where(np.asarray(tokens_BxP)[:, 0] == PREFER_A, A, B)
        return {"favored": jnp.asarray(favored_B), "seen": jnp.zeros(len(favored_B), bool)}

    def extend(self, state, tokens_BxT, lengths_B):
        favored, seen = np.asarray(state["favored"]), np.array(state["seen"])
        tokens_BxT = np.asarray(tokens_BxT)
        logits_BxT = np.zeros(tokens_BxT.shape, np.float32)
        for b, length in enumerate(np.asarray(lengths_B)):
            for t in range(length):
                seen[b] |= tokens_BxT[b, t] == favored[b]
                logits_BxT[b, t] = 2.0 if seen[b] or tokens_BxT[b, t] == EOT else -2.0
                if tokens_BxT[b, t] == NL:
                    seen[b] = False
        return {"favored": state["favored"], "seen": jnp.asarray(seen)}, jnp.asarray(logits_BxT)


def _steps(tokens):
    """The step tokens of a bigram response (every other token before <|eot_id|>)."""
    tokens = [int(t) for t in tokens if t != EOT]
    assert tokens[1::2] == [NL] * (len(tokens) // 2)
    return tokens[0::2]


def _search(params, cfg, config=CONFIG, prompts=PROMPTS, scorer=None, ids=IDS):
    scorer = FakePrm() if scorer is None else scorer
    return search_beam.beam_search(
        params, cfg, scorer, prompts, ids, config, rng=jax.random.PRNGKey(1)
    )


def test_beam_search_returns_the_beam_the_prm_prefers(tiny_cfg, bigram_params):
    results = _search(bigram_params, tiny_cfg)
    assert len(results) == 3
    for prompt, result in zip(PROMPTS, results, strict=True):
        favored = A if prompt[0] == PREFER_A else B
        steps = _steps(result.tokens)
        assert result.finished and result.tokens[-1] == EOT
        assert steps and set(steps) == {favored}
        # Each step holds the favored token (logit +2), and the answer step is scored too.
        good = 1 / (1 + np.exp(-2.0))
        np.testing.assert_allclose(result.step_probs, [good] * (len(steps) + 1), rtol=1e-6)
        assert result.score == pytest.approx((len(steps) + 1) * np.log(good))
        assert result.tokens_used >= len(result.tokens)


def test_step_budget_stops_the_search_and_tokens_are_counted(tiny_cfg, bigram_params):
    results = _search(bigram_params, tiny_cfg, dataclasses.replace(CONFIG, max_rounds=1))
    for prompt, result in zip(PROMPTS, results, strict=True):
        # One round from the prompt: W * C candidates of exactly one step ("A\n" or "B\n").
        assert result.rounds == 1 and not result.finished
        assert result.tokens_used == 2 * 3 * 2
        assert _steps(result.tokens) == [A if prompt[0] == PREFER_A else B]
        assert len(result.step_probs) == 1


def test_token_budget_caps_the_compute(tiny_cfg, bigram_params):
    capped = _search(bigram_params, tiny_cfg, dataclasses.replace(CONFIG, token_budget=12))
    assert [r.tokens_used for r in capped] == [12, 12, 12]
    free = _search(bigram_params, tiny_cfg)
    assert all(r.tokens_used > 12 for r in free)


def test_gathered_caches_decode_like_their_prefix_from_scratch(tiny_cfg, tiny_params):
    prompts = [[5, 9, 17, 3], [42, 7]]
    tokens_BxP, lengths_B = sampler.pad_prompts(prompts, PAD)
    cache, logits_BxV = sampler.prefill(
        tiny_params, tiny_cfg, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), 32
    )
    forked = sampler.decode(
        tiny_params,
        tiny_cfg,
        sampler.fork_cache(cache, 3),
        sampler.fork_rows(logits_BxV, 3),
        jax.random.PRNGKey(0),
        max_new_tokens=5,
        stop_tokens=(NL,),
    )
    index = np.array([4, 0, 0, 2, 5])  # rows of problem 1, then 0: reordered and repeated
    gathered = search_beam.gather_rows((forked.cache, forked.last_logits_BxV), index)
    continued = sampler.decode(
        tiny_params, tiny_cfg, *gathered, jax.random.PRNGKey(1), max_new_tokens=6, greedy=True
    )
    tokens = np.asarray(forked.tokens_BxT)
    prefixes = [
        prompts[row // 3] + [int(t) for t in tokens[row, : forked.lengths_B[row]]] for row in index
    ]
    tokens_BxP, lengths_B = sampler.pad_prompts(prefixes, PAD)
    alone = sampler.decode(
        tiny_params,
        tiny_cfg,
        *sampler.prefill(
            tiny_params, tiny_cfg, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), 32
        ),
        jax.random.PRNGKey(1),
        max_new_tokens=6,
        greedy=True,
    )
    np.testing.assert_array_equal(continued.tokens_BxT, alone.tokens_BxT)
    np.testing.assert_allclose(continued.logprobs_BxT, alone.logprobs_BxT, atol=1e-5)


@pytest.fixture(scope="module")
def prm_params(tiny_cfg, tiny_params):
    """The tiny random parameters plus a random reward head."""
    kernel = jax.random.normal(jax.random.PRNGKey(3), (tiny_cfg.d_model, 1))
    return {**tiny_params, "reward_head": {"kernel": kernel, "bias": jnp.zeros((1,))}}


def surprise_prm(tiny_cfg, prm_params):
    """(config, params) of the same PRM with a reward head that reads surprise (window 8,
    which reaches back into the 4-token prompt, whose surprise must not count)."""
    cfg = dataclasses.replace(tiny_cfg, reward_surprise_window=8)
    head = {"linear": prm_params["reward_head"], "surprise_scale": jnp.full((1,), 0.3)}
    return cfg, {**prm_params, "reward_head": head}


@pytest.mark.parametrize("surprise", [False, True])
def test_greedy_search_reproduces_greedy_decoding_and_prm_scores(
    tiny_cfg, tiny_params, prm_params, surprise
):
    """Rounds of forking and gathering must not change a single greedy token or PRM score,
    for the cached PRM scorer and for the whole-sequence one a surprise-reading head needs."""
    prompt = [3, 1, 4, THOUGHTS]
    plain = sampler.sample(
        tiny_params,
        tiny_cfg,
        [prompt],
        rng=jax.random.PRNGKey(0),
        max_new_tokens=24,
        stop_tokens=(),
        greedy=True,
    )
    greedy = [int(t) for t in plain.tokens_BxNxT[0, 0]]
    # Call two of the greedy tokens "\n" and <|eot_id|>: the search then ends steps there.
    newline, eot = greedy[3], greedy[10]
    assert eot not in greedy[:10] and greedy[:10].count(newline) >= 3
    ids = dataclasses.replace(IDS, newline=newline, eot=eot)
    config = dataclasses.replace(CONFIG, temperature=0.0)
    prm_cfg = tiny_cfg
    if surprise:
        prm_cfg, prm_params = surprise_prm(tiny_cfg, prm_params)
    scorer = prm_scorer(prm_params, prm_cfg)
    assert isinstance(scorer, WholeSequencePrmScorer if surprise else PrmScorer)
    result = _search(tiny_params, tiny_cfg, config, [prompt] * 3, scorer, ids)[0]
    expected = greedy[: greedy.index(eot) + 1]
    assert result.finished
    np.testing.assert_array_equal(result.tokens, expected)
    full = jnp.asarray([prompt + expected])
    response_mask = jnp.asarray([[0] * len(prompt) + [1] * len(expected)])
    rewards = (
        Transformer(prm_cfg, heads=("reward",))
        .apply({"params": prm_params}, full, response_mask_BxL=response_mask, method="forward")
        .scores["reward"][0]
    )
    ends = [len(prompt) + i for i, t in enumerate(expected[:-1]) if t == newline]
    ends.append(len(prompt) + len(expected) - 1)  # the answer step, at <|eot_id|>
    assert len(ends) == len(result.step_probs) >= 2
    np.testing.assert_allclose(
        result.step_probs, jax.nn.sigmoid(rewards[jnp.array(ends)]), atol=1e-5
    )


def test_search_tokens_track_the_thoughts_span():
    assert IDS.in_thoughts_after(False, [1, THOUGHTS, A, NL])
    assert not IDS.in_thoughts_after(True, [A, 17, NL])
    assert IDS.in_thoughts_after(True, [A, NL])


def test_bad_config_and_prompts_are_rejected(tiny_cfg, bigram_params):
    with pytest.raises(ValueError, match="beam_width"):
        BeamConfig(beam_width=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        _search(bigram_params, tiny_cfg, BeamConfig(max_new_tokens=tiny_cfg.max_seq_len))
