"""Step-level beam search guided by a process reward model, sharing prefixes through KV caches.

Each round, every live beam of every problem proposes C continuations that run to its next
thought step end (the "\\n" closing a line inside `<|thoughts|>`) or to `<|eot_id|>`. The PRM
scores each new step; `rl.search.beam_select` keeps the W expansions with the best cumulative
log step probability. Lines outside the thoughts (headline, summary, visible answer) are not
steps: a continuation runs through them to the next step end, so every round ends on a
scored step or a finished response.

Rows are laid out problem-major, R = P * W * C (row (p * W + w) * C + c is candidate c of beam
w of problem p). The prompt is prefilled once per problem and forked; after each round the
survivors' caches (policy and PRM) are gathered and forked again, so no prefix is recomputed.
All tensors keep fixed shapes, so every round reuses the same compiled programs.

Scoring conventions: a child that finishes adds its answer step, the PRM's probability at its
<|eot_id|> (`rl.reward_model.prm_positions`), and then keeps its score; only the first finished
child of a beam is kept, so beams do not fill up with copies of one thought prefix. A response
cut at `max_new_tokens` has no answer step and scores UNSCORED, below every scored beam.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from data import format as fmt
from model import sampler
from model.config import ModelConfig
from model.transformer import KVCache, Transformer, init_cache, reads_surprise
from rl.generate import user_prompt_tokens
from rl.search import beam_select

Array = jax.Array
UNSCORED = -1e9  # log-score of a beam the PRM never scored; below any product of real steps
MIN_PROMPT_BUCKET = 16
_LIVE, _EOT, _CUT = 0, 1, 2  # beam and segment states; a dead beam is a live one scored -inf
_STEP = 3  # segment state: ended on a thought step


@dataclasses.dataclass(frozen=True)
class SearchTokens:
    """The token ids the search reacts to."""

    newline: int
    eot: int
    pad: int
    thoughts: int  # opens the span whose lines are steps
    closers: tuple[int, ...]  # tokens that end a thoughts span: every other special token

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SearchTokens:
        """The ids of a tokenizer built by data.tokenizer (every marker a single piece).

        Spans end as in `rl.reward_model.step_end_positions`, so the search scores exactly
        the steps the PRM was trained on.
        """
        newline = tokenizer.encode("\n")
        if len(newline) != 1:
            raise ValueError(f"the tokenizer must encode '\\n' as one piece, got {newline}")
        closers = [t for t in fmt.SPECIAL_TOKENS if t != fmt.THOUGHTS]
        return cls(
            newline=newline[0],
            eot=tokenizer.eot_id,
            pad=tokenizer.pad_id,
            thoughts=tokenizer.token_id(fmt.THOUGHTS),
            closers=tuple(tokenizer.token_id(m) for m in closers),
        )

    def in_thoughts_after(self, in_thoughts: bool, tokens: Sequence[int]) -> bool:
        """Whether the text is inside a thoughts span after `tokens`, given the state before."""
        for token in reversed(tokens):
            if token == self.thoughts:
                return True
            if token in self.closers:
                return False
        return in_thoughts


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Search shape and budgets; W = beam_width, C = num_candidates, T = max_step_tokens."""

    beam_width: int = 4
    num_candidates: int = 4
    max_new_tokens: int = 320  # response length limit, as for sampling
    max_step_tokens: int = 32  # tokens per decode call; a longer step takes several calls
    max_rounds: int = 64  # step budget: expansions per problem
    token_budget: int = 0  # sampled tokens per problem (all candidates); 0 = unlimited
    temperature: float = 1.0  # <= 0 decodes greedily (every candidate then agrees)
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if min(self.beam_width, self.num_candidates, self.max_new_tokens) < 1:
            raise ValueError(f"beam_width, num_candidates and max_new_tokens must be >= 1: {self}")
        if min(self.max_step_tokens, self.max_rounds) < 1 or self.token_budget < 0:
            raise ValueError(f"need max_step_tokens, max_rounds >= 1, token_budget >= 0: {self}")


@dataclasses.dataclass(frozen=True)
class BeamResult:
    """The best beam of one problem."""

    tokens: np.ndarray  # int32 response tokens, <|eot_id|> included when finished
    score: float  # cumulative log PRM step probability (UNSCORED-based if never scored)
    step_probs: np.ndarray  # float32 [S], PRM probability of each step
    finished: bool  # ended with <|eot_id|>
    tokens_used: int  # tokens sampled for this problem over all candidates: the compute
    rounds: int  # expansions run
    text: str = ""  # the decoded response without <|eot_id|> (filled by `search_questions`)


class StepScorer(Protocol):
    """Incremental step scores; the state is a pytree of batch-major rows (or KVCaches)."""

    def start(self, tokens_BxP: Array, lengths_B: Array, max_len: int) -> Any:
        """State after right-padded prompts, with room for max_len tokens per row."""
        ...

    def extend(self, state: Any, tokens_BxT: Array, lengths_B: Array) -> tuple[Any, Array]:
        """Appends each row's first lengths_B tokens; returns (state, step logits [B, T])."""
        ...


# ----------------------------------------------------------------------------- caches


@jax.jit
def gather_cache(cache: KVCache, index_R: Array) -> KVCache:
    """The cache rows `index_R` (repeats allowed): how survivors are kept and forked."""
    return cache.map_rows(lambda x: jnp.take(x, index_R, axis=0))


def gather_rows(tree: Any, index_R: Array) -> Any:
    """Rows `index_R` of every KVCache and batch-major array in a pytree."""
    index_R = jnp.asarray(index_R, jnp.int32)

    def take(x):
        return gather_cache(x, index_R) if isinstance(x, KVCache) else jnp.take(x, index_R, 0)

    return jax.tree.map(take, tree, is_leaf=lambda x: isinstance(x, KVCache))


@functools.partial(jax.jit, static_argnames=("cfg", "head"))
def _reward_extend(
    params, cfg: ModelConfig, head: str, cache: KVCache, tokens_BxT: Array, lengths_B: Array
) -> tuple[KVCache, Array]:
    """Appends tokens to a reward model's cache; returns (cache, head logits [B, T])."""
    segment_ids_BxT = (jnp.arange(tokens_BxT.shape[1])[None, :] < lengths_B[:, None]).astype(
        jnp.int32
    )
    out = Transformer(cfg, heads=(head,)).apply(
        {"params": params},
        tokens_BxT,
        segment_ids_BxL=segment_ids_BxT,
        cache=cache,
        compute_logits=False,
        method="forward",
    )
    return out.cache, out.scores[head]


@dataclasses.dataclass(frozen=True)
class PrmScorer:
    """A PRM (a Transformer with a scalar head) read through its own KV cache."""

    params: Any
    cfg: ModelConfig
    head: str = "reward"

    def start(self, tokens_BxP: Array, lengths_B: Array, max_len: int) -> KVCache:
        """The PRM cache after the prompts."""
        cache = init_cache(self.cfg, tokens_BxP.shape[0], max_len)
        return _reward_extend(self.params, self.cfg, self.head, cache, tokens_BxP, lengths_B)[0]

    def extend(self, state: KVCache, tokens_BxT: Array, lengths_B: Array) -> tuple[KVCache, Array]:
        """Appends tokens; the logits at a step's "\\n" are its step logit."""
        return _reward_extend(self.params, self.cfg, self.head, state, tokens_BxT, lengths_B)


@functools.partial(jax.jit, static_argnames=("cfg", "head"))
def _reward_rescore(
    params,
    cfg: ModelConfig,
    head: str,
    tokens_BxM: Array,
    lengths_B: Array,
    prompt_lengths_B: Array,
    new_BxT: Array,
    new_lengths_B: Array,
) -> tuple[tuple[Array, Array, Array], Array]:
    """Writes each row's new tokens after its first lengths_B and scores the whole rows,
    whose tokens after the first prompt_lengths_B are the response; returns ((tokens,
    lengths, prompt lengths), head logits [B, T] at the new tokens)."""
    B, M = tokens_BxM.shape
    at_BxT = lengths_B[:, None] + jnp.arange(new_BxT.shape[1])[None, :]
    written_BxT = jnp.arange(new_BxT.shape[1])[None, :] < new_lengths_B[:, None]
    rows_Bx1 = jnp.arange(B)[:, None]
    tokens_BxM = tokens_BxM.at[rows_Bx1, jnp.where(written_BxT, at_BxT, M)].set(
        new_BxT, mode="drop"
    )
    lengths_B = lengths_B + new_lengths_B
    segment_ids_BxM = (jnp.arange(M)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    response_mask_BxM = segment_ids_BxM * (jnp.arange(M)[None, :] >= prompt_lengths_B[:, None])
    out = Transformer(cfg, heads=(head,)).apply(
        {"params": params},
        tokens_BxM,
        segment_ids_BxL=segment_ids_BxM,
        compute_logits=False,
        response_mask_BxL=response_mask_BxM,
        method="forward",
    )
    logits_BxT = jnp.take_along_axis(out.scores[head], jnp.minimum(at_BxT, M - 1), axis=1)
    return (tokens_BxM, lengths_B, prompt_lengths_B), logits_BxT


@dataclasses.dataclass(frozen=True)
class WholeSequencePrmScorer:
    """A PRM that rescores each row whole at every extension, without a cache.

    For a reward head that reads the language model's surprise (model.transformer.
    RewardHead): a token's surprise comes from the logits before it, which a KV cache does
    not keep. Each extension costs a forward over the row so far instead of over the new
    tokens; at this repo's sizes the policy's decoding still dominates.
    """

    params: Any
    cfg: ModelConfig
    head: str = "reward"

    def start(self, tokens_BxP: Array, lengths_B: Array, max_len: int) -> tuple[Array, ...]:
        """The prompts, in rows with room for max_len tokens; (tokens, lengths, prompt lengths)."""
        tokens_BxM = jnp.zeros((tokens_BxP.shape[0], max_len), jnp.int32)
        tokens_BxM = tokens_BxM.at[:, : tokens_BxP.shape[1]].set(tokens_BxP)
        lengths_B = jnp.asarray(lengths_B, jnp.int32)
        return tokens_BxM, lengths_B, lengths_B

    def extend(self, state, tokens_BxT: Array, lengths_B: Array) -> tuple[Any, Array]:
        """Appends tokens; the logits at a step's "\\n" are its step logit."""
        return _reward_rescore(self.params, self.cfg, self.head, *state, tokens_BxT, lengths_B)


def prm_scorer(params, cfg: ModelConfig, head: str = "reward") -> StepScorer:
    """The cached scorer, or the whole-sequence one for a head that reads surprise."""
    if reads_surprise(cfg, head):
        return WholeSequencePrmScorer(params, cfg, head)
    return PrmScorer(params, cfg, head)


# ----------------------------------------------------------------------------- one decode call


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_step_tokens", "top_k", "top_p", "greedy", "ids"),
)
def _decode_segment(
    params,
    cfg: ModelConfig,
    cache: KVCache,
    logits_RxV: Array,
    active_R: Array,
    room_R: Array,
    rng: Array,
    temperature: Array,
    *,
    max_step_tokens: int,
    top_k: int,
    top_p: float,
    greedy: bool,
    ids: SearchTokens,
):
    """Decodes active rows to the next "\\n"/eot; inactive rows keep their cache and logits.

    Inactive rows are forced to sample eot at once, so they never hold the loop open. Lengths
    are cut to `room_R`, what is left of each row's response budget.
    """
    vocab = jnp.arange(logits_RxV.shape[-1])
    forced_RxV = jnp.where(vocab == ids.eot, 0.0, -jnp.inf)[None, :]
    out = sampler.decode(
        params,
        cfg,
        cache,
        jnp.where(active_R[:, None], logits_RxV, forced_RxV),
        rng,
        temperature,
        max_new_tokens=max_step_tokens,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        stop_tokens=(ids.newline, ids.eot),
        pad_id=ids.pad,
    )
    lengths_R = jnp.where(active_R, jnp.minimum(out.lengths_B, room_R), 0)
    done_R = active_R & out.done_B & (out.lengths_B <= room_R)
    # Slots past end_index are invisible and later overwritten: moving it back undoes a row.
    new_cache = out.cache.replace(end_index=cache.end_index + lengths_R)
    new_logits_RxV = jnp.where(active_R[:, None], out.last_logits_BxV, logits_RxV)
    return new_cache, new_logits_RxV, out.tokens_BxT, lengths_R, done_R


# ----------------------------------------------------------------------------- the search


@dataclasses.dataclass
class _Beams:
    """Host-side beams of P problems, W each."""

    tokens: list[list[list[int]]]  # [P][W] response tokens
    steps: list[list[list[float]]]  # [P][W] PRM step probabilities
    score_PxW: np.ndarray  # float64 cumulative log-score; -inf: dead
    state_PxW: np.ndarray  # _LIVE, _EOT or _CUT
    thoughts_PxW: np.ndarray  # bool: inside a thoughts span

    def live_PxW(self) -> np.ndarray:
        """Beams that can still grow."""
        return (self.state_PxW == _LIVE) & np.isfinite(self.score_PxW)


@dataclasses.dataclass
class _Segments:
    """What one round's R rows produced."""

    tokens: list[list[int]]
    state_R: np.ndarray  # _LIVE (not expanded), _STEP, _EOT or _CUT
    logit_R: np.ndarray  # PRM logit of the step ended (_STEP) or of the answer step (_EOT)
    thoughts_R: np.ndarray


def _bucket(n: int) -> int:
    """The smallest power of two >= max(n, MIN_PROMPT_BUCKET), so few shapes compile."""
    return max(MIN_PROMPT_BUCKET, 1 << max(n - 1, 0).bit_length())


def _expand(policy, scorer, carry, beams, expanding_R, used_P, rng, config, ids):
    """Runs decode calls until every expanding row ends a step, finishes, or is cut."""
    params, cfg = policy
    W, C = config.beam_width, config.num_candidates
    cache, logits_RxV, score_state = carry
    R = logits_RxV.shape[0]
    parent = np.arange(R) // C  # flat beam index p * W + w
    resp_len_R = np.array([len(beams.tokens[b // W][b % W]) for b in parent])
    seg = _Segments(
        tokens=[[] for _ in range(R)],
        state_R=np.full(R, _LIVE),
        logit_R=np.zeros(R, np.float32),
        thoughts_R=beams.thoughts_PxW.reshape(-1)[parent].copy(),
    )
    active_R = expanding_R.copy()
    call = 0
    while active_R.any():
        room_R = config.max_new_tokens - resp_len_R
        cache, logits_RxV, tokens_RxT, lengths_R, done_R = _decode_segment(
            params,
            cfg,
            cache,
            logits_RxV,
            jnp.asarray(active_R),
            jnp.asarray(room_R, jnp.int32),
            jax.random.fold_in(rng, call),
            jnp.float32(max(config.temperature, 1e-6)),
            max_step_tokens=config.max_step_tokens,
            top_k=config.top_k,
            top_p=float(config.top_p),
            greedy=config.temperature <= 0,
            ids=ids,
        )
        score_state, step_logits_RxT = scorer.extend(score_state, tokens_RxT, lengths_R)
        tokens_RxT, lengths_R, done_R = map(np.asarray, (tokens_RxT, lengths_R, done_R))
        step_logits_RxT = np.asarray(step_logits_RxT)
        np.add.at(used_P, parent // W, lengths_R)
        resp_len_R += lengths_R
        for r in np.flatnonzero(active_R):
            new = [int(t) for t in tokens_RxT[r, : lengths_R[r]]]
            seg.tokens[r] += new
            seg.thoughts_R[r] = ids.in_thoughts_after(bool(seg.thoughts_R[r]), new)
            if done_R[r] and new[-1] == ids.eot:  # the answer step: scored at <|eot_id|>
                seg.state_R[r] = _EOT
                seg.logit_R[r] = step_logits_RxT[r, lengths_R[r] - 1]
            elif done_R[r] and seg.thoughts_R[r]:  # stopped on a "\n" inside the thoughts
                seg.state_R[r] = _STEP
                seg.logit_R[r] = step_logits_RxT[r, lengths_R[r] - 1]
            elif resp_len_R[r] >= config.max_new_tokens:
                seg.state_R[r] = _CUT
        active_R &= seg.state_R == _LIVE
        call += 1
    return (cache, logits_RxV, score_state), seg


def _candidate_scores(beams: _Beams, seg: _Segments, expanding_PxW, config) -> np.ndarray:
    """[P, W, C] log-score each expansion adds to its beam (-inf: not a candidate)."""
    P, W, C = len(beams.tokens), config.beam_width, config.num_candidates
    cand_PxWxC = np.full((P, W, C), -np.inf)
    state_PxWxC = seg.state_R.reshape(P, W, C)
    logit_PxWxC = seg.logit_R.reshape(P, W, C).astype(np.float64)
    for p in range(P):
        for w in range(W):
            if not expanding_PxW[p, w]:
                cand_PxWxC[p, w, 0] = 0.0  # carried over unchanged
                continue
            states = state_PxWxC[p, w]
            step = states == _STEP
            # log sigmoid, stable for large |logit|
            cand_PxWxC[p, w, step] = -np.logaddexp(0.0, -logit_PxWxC[p, w, step])
            # One finished child per kind: a finished one adds its answer step, a cut one has none.
            eot = np.flatnonzero(states == _EOT)[:1]
            cand_PxWxC[p, w, eot] = -np.logaddexp(0.0, -logit_PxWxC[p, w, eot])
            cand_PxWxC[p, w, np.flatnonzero(states == _CUT)[:1]] = UNSCORED
    return cand_PxWxC


def _select(beams: _Beams, seg: _Segments, cand_PxWxC, expanding_PxW, config):
    """The next beams and, for each, the row its caches come from."""
    P, W, C = cand_PxWxC.shape
    select = jax.vmap(functools.partial(beam_select, beam_width=W))
    parent_PxW, child_PxW, score_PxW = map(
        np.asarray, select(beams.score_PxW.astype(np.float32), cand_PxWxC.astype(np.float32))
    )
    nxt = _Beams(
        tokens=[],
        steps=[],
        score_PxW=score_PxW.astype(np.float64),
        state_PxW=np.zeros((P, W), int),
        thoughts_PxW=np.zeros((P, W), bool),
    )
    rows_PxW = (np.arange(P)[:, None] * W + parent_PxW) * C + child_PxW
    for p in range(P):
        nxt.tokens.append([])
        nxt.steps.append([])
        for k in range(W):
            w, r = parent_PxW[p, k], rows_PxW[p, k]
            tokens, steps = list(beams.tokens[p][w]), list(beams.steps[p][w])
            state, thoughts = beams.state_PxW[p, w], beams.thoughts_PxW[p, w]
            if expanding_PxW[p, w]:
                tokens += seg.tokens[r]
                thoughts = seg.thoughts_R[r]
                if seg.state_R[r] in (_STEP, _EOT):  # a thought step or the answer step
                    steps.append(float(1.0 / (1.0 + np.exp(-seg.logit_R[r]))))
                if seg.state_R[r] != _STEP:
                    state = seg.state_R[r]
            nxt.tokens[p].append(tokens)
            nxt.steps[p].append(steps)
            nxt.state_PxW[p, k], nxt.thoughts_PxW[p, k] = state, thoughts
    return nxt, rows_PxW


def _best(beams: _Beams, used_P, rounds: int) -> list[BeamResult]:
    """Per problem, the best finished beam, else the best beam of any kind."""
    results = []
    for p in range(len(beams.tokens)):
        scores = beams.score_PxW[p]
        finished = (beams.state_PxW[p] == _EOT) & np.isfinite(scores)
        w = int(np.argmax(np.where(finished, scores, -np.inf) if finished.any() else scores))
        results.append(
            BeamResult(
                tokens=np.asarray(beams.tokens[p][w], np.int32),
                score=float(scores[w]),
                step_probs=np.asarray(beams.steps[p][w], np.float32),
                finished=bool(finished[w]),
                tokens_used=int(used_P[p]),
                rounds=rounds,
            )
        )
    return results


def beam_search(
    params,
    cfg: ModelConfig,
    scorer: StepScorer,
    prompts: Sequence[Sequence[int]],
    ids: SearchTokens,
    config: BeamConfig,
    *,
    rng: Array,
) -> list[BeamResult]:
    """PRM-guided step-level beam search from token prompts; one BeamResult per prompt."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("beam_search needs at least one prompt, each with at least one token")
    longest = max(len(p) for p in prompts)
    if longest + config.max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={config.max_new_tokens} exceeds "
            f"the model's max_seq_len={cfg.max_seq_len}; lower max_new_tokens"
        )
    P, W, C = len(prompts), config.beam_width, config.num_candidates
    tokens_BxP, lengths_B = sampler.pad_prompts(prompts, ids.pad)
    padded = np.full((P, _bucket(tokens_BxP.shape[1])), ids.pad, np.int32)
    padded[:, : tokens_BxP.shape[1]] = tokens_BxP
    tokens_BxP, lengths_B = jnp.asarray(padded), jnp.asarray(lengths_B)
    # Room for the response, one decode call past it, and the pad written after a stop.
    max_len = tokens_BxP.shape[1] + config.max_new_tokens + config.max_step_tokens + 2
    cache, logits_BxV = sampler.prefill(params, cfg, tokens_BxP, lengths_B, max_len)
    score_state = scorer.start(tokens_BxP, lengths_B, max_len)
    carry = (
        sampler.fork_cache(cache, W * C),
        sampler.fork_rows(logits_BxV, W * C),
        gather_rows(score_state, np.repeat(np.arange(P), W * C)),
    )
    thoughts = [ids.in_thoughts_after(False, [int(t) for t in p]) for p in prompts]
    beams = _Beams(
        tokens=[[[] for _ in range(W)] for _ in range(P)],
        steps=[[[] for _ in range(W)] for _ in range(P)],
        score_PxW=np.zeros((P, W)),  # W copies of the prompt: round 1 draws W * C first steps
        state_PxW=np.full((P, W), _LIVE),
        thoughts_PxW=np.repeat(np.asarray(thoughts, bool)[:, None], W, axis=1),
    )
    used_P = np.zeros(P, np.int64)
    rounds = 0
    while rounds < config.max_rounds:
        in_budget_P = used_P < config.token_budget if config.token_budget else np.ones(P, bool)
        expanding_PxW = beams.live_PxW() & in_budget_P[:, None]
        if not expanding_PxW.any():
            break
        carry, seg = _expand(
            (params, cfg),
            scorer,
            carry,
            beams,
            np.repeat(expanding_PxW.reshape(-1), C),
            used_P,
            jax.random.fold_in(rng, rounds),
            config,
            ids,
        )
        cand_PxWxC = _candidate_scores(beams, seg, expanding_PxW, config)
        beams, rows_PxW = _select(beams, seg, cand_PxWxC, expanding_PxW, config)
        carry = gather_rows(carry, np.repeat(rows_PxW.reshape(-1), C))
        rounds += 1
    return _best(beams, used_P, rounds)


def search_questions(
    params,
    cfg: ModelConfig,
    tokenizer,
    scorer: StepScorer,
    questions: Sequence[str],
    config: BeamConfig,
    *,
    rng: Array,
    batch_size: int = 8,
) -> list[BeamResult]:
    """Beam search for user questions, `batch_size` problems per compiled batch."""
    ids = SearchTokens.from_tokenizer(tokenizer)
    prompts = [user_prompt_tokens(tokenizer, q) for q in questions]
    results: list[BeamResult] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # Copies of the first prompt keep the batch shape, as rl.generate does.
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        found = beam_search(
            params, cfg, scorer, padded, ids, config, rng=jax.random.fold_in(rng, start)
        )
        for result in found[: len(chunk)]:
            text_ids = result.tokens[:-1] if result.finished else result.tokens
            results.append(dataclasses.replace(result, text=tokenizer.decode(text_ids)))
    return results
