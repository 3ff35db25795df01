"""The rollout phase: a batch producer that samples with the current policy and serves minibatches.

    when the buffer is used up (epochs x minibatches served):
        prompts   <- the next slice of a seeded shuffle of the train split
        sample G responses per prompt with the KV-cache sampler (state.params)
        rewards   <- verifiers, format, length, PRM     (host work on a thread pool ...)
        old/ref log-probs and values <- full forwards  (... while the device runs these)
        buffer    <- advantages (GAE or group-relative), or EI rows, or preference pairs
        KL controller update
    serve minibatch m of epoch e: rows perm(e)[m*b : (m+1)*b]

With several JAX processes every jitted call must see the same inputs everywhere, so each
process samples and scores all of a rollout's rows (one call over the whole mesh), rewards
only its own share of them, gathers every process's rewards and builds the same buffer
(global advantage whitening, KL controller and metrics); it then keeps its share of the
buffer's rows. With one process this is the plain single-host rollout.

The loop sees an ordinary producer (train/batches.py): `next(state)` returns host arrays with
fixed shapes. The buffer, the position in it, the rollout counter, the KL coefficient and the
last rollout's metrics go into the checkpoint (`RolloutSave`), and every random choice is a
function of (seed, rollout index, epoch), so a resumed run serves exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from model import sampler
from model.transformer import Transformer
from rl import buffers
from rl import kl as kl_lib
from rl.generate import all_process_rows, host_value, own_rows, user_prompt_tokens
from rl.ppo_losses import token_logprobs
from rl.rewards import Responses, Scored, make_reward_mix
from train import init_from

KINDS = ("ppo", "grpo", "ei", "pairs")  # producers registered as rollout_<kind>


@functools.partial(jax.jit, static_argnames=("cfg", "heads"))
def token_outputs(params, inputs_BxL, targets_BxL, segment_ids_BxL, *, cfg, heads=()):
    """log p(target) and the value head (0 without one) at every position, [B, L] each."""
    out = Transformer(cfg, heads).apply(
        {"params": params}, inputs_BxL, None, segment_ids_BxL, method="forward"
    )
    logprobs_BxL = token_logprobs(out.logits, targets_BxL)
    values_BxL = out.scores.get("value", jax.numpy.zeros_like(logprobs_BxL))
    return logprobs_BxL, values_BxL


def reference_of(config) -> tuple[str, int]:
    """(source, checkpoint step) of the KL reference: `rl.ref_from`'s newest checkpoint, else
    the checkpoint the policy started from (`init_from` at `init_from_step`)."""
    if config.rl.ref_from:
        return config.rl.ref_from, 0
    return config.init_from, config.init_from_step


def make_controller(kl_config):
    """The KL coefficient controller: AdaptiveKL toward `target`, or FixedKL."""
    if kl_config.adaptive:
        return kl_lib.AdaptiveKL(float(kl_config.coef), kl_config.target, kl_config.horizon)
    return kl_lib.FixedKL(float(kl_config.coef))


@dataclasses.dataclass
class Position:
    """Where the producer is: rollouts done, and the next minibatch of the current buffer."""

    rollout: int = 0
    epoch: int = 0
    minibatch: int = 0


class RolloutProducer:
    """Samples rollouts with the current parameters and serves their minibatches."""

    def __init__(self, config, prepared, model, kind: str):
        from data.builder import load_split, record_to_problem

        if kind not in KINDS:
            raise ValueError(f"unknown rollout kind {kind!r}; use one of {KINDS}")
        self.kind, self.rl, self.seed = kind, config.rl, config.seed
        self.model, self.tokenizer = model, prepared.tokenizer
        self.seq_len = config.data.seq_len
        if config.batch_size % jax.process_count() or config.rl.prompts % jax.process_count():
            raise ValueError("batch_size and rl.prompts must split evenly over the processes")
        self.batch_rows = config.batch_size // jax.process_count()
        self.rows = self.rl.prompts // jax.process_count() * self.rl.group_size  # per process
        if kind in ("ppo", "grpo") and self.rows % self.batch_rows:
            raise ValueError(
                f"a rollout of rl.prompts * rl.group_size = {self.rows} rows per process does "
                f"not split into minibatches of batch_size = {self.batch_rows}; make it a multiple"
            )
        source = load_split(prepared.builder, self.rl.split)
        self.problems = [record_to_problem(source[i]) for i in range(len(source))]
        if not self.problems:
            raise ValueError(f"split {self.rl.split!r} is empty: no prompts to roll out")
        self.prompt_tokens = [user_prompt_tokens(self.tokenizer, p.prompt) for p in self.problems]
        longest = max(map(len, self.prompt_tokens))
        if longest + self.rl.max_new_tokens > min(self.seq_len, model.cfg.max_seq_len):
            raise ValueError(
                f"the longest prompt ({longest} tokens) plus rl.max_new_tokens="
                f"{self.rl.max_new_tokens} exceeds data.seq_len={self.seq_len} or the model's "
                f"max_seq_len={model.cfg.max_seq_len}; raise data.seq_len or lower max_new_tokens"
            )
        self.rewards = make_reward_mix(self.rl, self.tokenizer)
        self.executor = ThreadPoolExecutor(max(self.rl.reward_workers, 1))
        self.controller = make_controller(self.rl.kl)
        self.ref_source, self.ref_step = reference_of(config)
        if not self.ref_source and self.rl.kl.coef > 0:
            raise ValueError(
                "rl.kl.coef > 0 needs a reference policy: set init_from (or rl.ref_from) to the "
                "SFT workdir, or set rl.kl.coef=0"
            )
        self.ref_params = None  # restored on first use, into the policy's shardings
        self.position, self.buffer, self.metrics = Position(), {}, {}
        heads = tuple(h for h in model.heads if h == "value")
        self._forward = functools.partial(token_outputs, cfg=model.cfg, heads=heads)
        self._ref_forward = functools.partial(token_outputs, cfg=model.cfg)
        self._last_update_start = None

    # ------------------------------------------------------------------ the producer interface

    def next(self, state) -> dict[str, np.ndarray]:
        """The next minibatch; rolls out with `state.params` when the buffer is used up."""
        if self.position.epoch >= self.rl.epochs or not self.buffer:
            self._refill(state.params)
        pos = self.position
        num_rows = len(self.buffer["inputs"])
        order = np.random.default_rng([self.seed, pos.rollout, pos.epoch]).permutation(num_rows)
        rows = order[pos.minibatch * self.batch_rows : (pos.minibatch + 1) * self.batch_rows]
        pos.minibatch += 1
        if pos.minibatch * self.batch_rows >= num_rows:
            pos.epoch, pos.minibatch = pos.epoch + 1, 0
        return {key: value[rows] for key, value in self.buffer.items()}

    def host_metrics(self) -> dict[str, float]:
        """Statistics of the rollout the last batch came from."""
        return dict(self.metrics)

    def save_args(self):
        """A snapshot of the buffer, position, KL coefficient and metrics."""
        return RolloutSave(self.snapshot())

    def restore_args(self):
        """Restores that snapshot into this producer."""
        return RolloutRestore(self)

    def snapshot(self) -> dict[str, Any]:
        """Everything that the next batches depend on, besides the parameters."""
        return {
            "arrays": {key: np.array(value) for key, value in self.buffer.items()},
            "state": {
                "position": dataclasses.asdict(self.position),
                "kl_coef": float(self.controller.coef),
                "metrics": dict(self.metrics),
            },
        }

    def load_snapshot(self, snapshot: dict[str, Any]) -> None:
        """Continues from a `snapshot()`."""
        state = snapshot["state"]
        self.buffer = dict(snapshot["arrays"])
        self.position = Position(**state["position"])
        self.controller = self.controller.replace(coef=state["kl_coef"])
        self.metrics = dict(state["metrics"])

    # ------------------------------------------------------------------ rollouts

    def _refill(self, params) -> None:
        """Rolls out until the buffer has rows (EI and pairs may find none); resets the cursor."""
        for _ in range(max(self.rl.max_empty_rollouts, 1)):
            self.buffer = self._rollout(params)
            self.position = Position(rollout=self.position.rollout + 1)
            if self.buffer:
                return
        raise RuntimeError(
            f"{self.rl.max_empty_rollouts} rollouts in a row gave no training rows for "
            f"{self.kind!r}: no verified-correct response (or no prompt with both a correct and "
            "a wrong one). Train on an easier difficulty, raise rl.group_size, or start from a "
            "stronger init_from."
        )

    def _prompt_indices(self, rollout: int) -> np.ndarray:
        """Every process's prompts of rollout `rollout`, in order: a seeded shuffle per pass."""
        n = len(self.problems)
        flat_P = rollout * self.rl.prompts + np.arange(self.rl.prompts)
        return np.asarray([self._order(int(i) // n)[i % n] for i in flat_P])

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one producer per run)
    def _order(self, data_pass: int) -> np.ndarray:
        """The prompt order of pass `data_pass` over the split."""
        return np.random.default_rng([self.seed, data_pass]).permutation(len(self.problems))

    def _rollout(self, params) -> dict[str, np.ndarray]:
        """One rollout with `params`: samples, rewards and log-probs -> this process's rows."""
        start = time.perf_counter()
        update_time = start - self._last_update_start if self._last_update_start else 0.0
        index = self.position.rollout
        rollout = self._sample(params, index)  # every process's rows
        mine = slice(jax.process_index() * self.rows, (jax.process_index() + 1) * self.rows)
        finish_rewards = self.rewards.start(response_rows(rollout.responses, mine), self.executor)
        rollout = self._score(params, rollout)  # device work while the verifiers run
        scored_at = time.perf_counter()
        scored = all_process_scores(finish_rewards())
        rewarded_at = time.perf_counter()
        coef = float(self.controller.coef)
        buffer = self._build(rollout, scored, coef)
        kl_RxL = buffers.rollout_kl(rollout, self.rl.kl.estimator)
        sequence_kl = float(kl_RxL.sum(axis=1).mean())
        self.controller = kl_lib.update(self.controller, sequence_kl, len(kl_RxL))
        self.metrics = rollout_metrics(rollout, scored, buffer, self.tokenizer) | {
            "rollout/kl_ref": sequence_kl,
            "rollout/kl_coef": coef,
            "rollout/train_rows": float(len(buffer.get("inputs", ()))),
            "rollout/count": float(index + 1),  # rollouts sampled so far: the sampling budget
            "time/rollout": scored_at - start,
            "time/reward": rewarded_at - scored_at,
            "time/update": update_time,
        }
        self._last_update_start = time.perf_counter()
        return process_share(buffer)

    def _sample(self, params, index: int) -> buffers.Rollout:
        """G samples of each prompt, all processes' in one call, as rows without log-probs."""
        chosen = self._prompt_indices(index)
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), index)
        out = sampler.sample(
            params,
            self.model.cfg,
            [self.prompt_tokens[i] for i in chosen],
            rng=jax.random.fold_in(rng, 0),  # the same key on every process
            max_new_tokens=self.rl.max_new_tokens,
            stop_tokens=(self.tokenizer.eot_id,),
            temperature=self.rl.temperature,
            top_k=self.rl.top_k,
            top_p=self.rl.top_p,
            pad_id=self.tokenizer.pad_id,
            num_samples=self.rl.group_size,
        )
        G, T = self.rl.group_size, self.rl.max_new_tokens
        tokens_RxT = host_value(out.tokens_BxNxT).reshape(-1, T)
        lengths_R = host_value(out.lengths_BxN).reshape(-1)
        finished_R = host_value(out.done_BxN).reshape(-1)
        problems = [self.problems[i] for i in chosen for _ in range(G)]
        prompts = [self.prompt_tokens[i] for i in chosen for _ in range(G)]
        return layout(
            self.tokenizer, problems, prompts, tokens_RxT, lengths_R, finished_R, G, self.seq_len
        )

    def _score(self, params, rollout: buffers.Rollout) -> buffers.Rollout:
        """Fills the policy's and the reference's log-probs and the values, by full forwards."""
        inputs = (
            rollout.responses.inputs_RxL,
            rollout.targets_RxL,
            rollout.segment_ids_RxL,
        )
        logprobs_RxL, values_RxL = self._chunked(self._forward, params, inputs)
        mask_RxL = rollout.response_mask_RxL
        ref_params = self._reference(params)
        if ref_params is None:
            ref_logprobs_RxL = logprobs_RxL
        else:
            ref_logprobs_RxL, _ = self._chunked(self._ref_forward, ref_params, inputs)
        return dataclasses.replace(
            rollout,
            old_logprobs_RxL=np.where(mask_RxL > 0, logprobs_RxL, 0.0).astype(np.float32),
            ref_logprobs_RxL=np.where(mask_RxL > 0, ref_logprobs_RxL, 0.0).astype(np.float32),
            values_RxL=np.asarray(values_RxL, np.float32),
        )

    def _chunked(self, forward, params, arrays):
        """Runs `forward` over rows, rl.forward_batch per process at a time (one shape)."""
        n, b = len(arrays[0]), self.rl.forward_batch * jax.process_count()
        padded = [np.concatenate([a, np.zeros((-n % b, *a.shape[1:]), a.dtype)]) for a in arrays]
        outs = [forward(params, *(a[i : i + b] for a in padded)) for i in range(0, n + (-n % b), b)]
        return tuple(np.concatenate([host_value(o[k]) for o in outs])[:n] for k in range(2))

    def _reference(self, params):
        """The frozen reference trunk in the shardings of `params`; None without a reference."""
        if self.ref_params is None and self.ref_source:
            # A run's checkpoint or a Hugging Face directory, as init_from loads the policy.
            source = init_from.find_source(self.ref_source, self.ref_step)
            self.ref_params = init_from.load_params(source, self.model.cfg, like=params)
        return self.ref_params

    def _build(self, rollout, scored, kl_coef: float) -> dict[str, np.ndarray]:
        """The algorithm's training rows."""
        rl, kl_in_reward = self.rl, self.rl.kl.mode == "reward"
        if self.kind == "ppo":
            return buffers.ppo_buffer(
                rollout,
                scored,
                kl_coef=kl_coef,
                kl_in_reward=kl_in_reward,
                estimator=rl.kl.estimator,
                gamma=rl.gamma,
                lam=rl.lam,
                whiten=rl.whiten_advantages,
            )
        if self.kind == "grpo":
            return buffers.grpo_buffer(
                rollout,
                scored,
                kl_coef=kl_coef,
                kl_in_reward=kl_in_reward,
                estimator=rl.kl.estimator,
                normalize_std=rl.group_normalize_std,
            )
        # Every process then serves the same number of minibatches from its share.
        multiple = self.batch_rows * jax.process_count()
        if self.kind == "ei":
            return buffers.ei_buffer(rollout, scored, multiple=multiple)
        return buffers.pair_buffer(rollout, scored, multiple=multiple)


def response_rows(responses: Responses, rows: slice) -> Responses:
    """The responses of `rows`."""
    return dataclasses.replace(
        responses,
        **{f.name: getattr(responses, f.name)[rows] for f in dataclasses.fields(responses)},
    )


def all_process_scores(scored: Scored) -> Scored:
    """Every process's rewards of its own rows, in process order (a collective)."""
    return Scored(*all_process_rows((scored.rewards_RxT, scored.components, scored.correct_R)))


def process_share(buffer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's equal share of a buffer that every process built alike ({} stays {})."""
    if not buffer:
        return buffer
    return own_rows(buffer, len(buffer["inputs"]) // jax.process_count())


def layout(tokenizer, problems, prompts, tokens_RxT, lengths_R, finished_R, group_size, length):
    """Prompt + response rows [R, L] with targets, segment ids and the response mask."""
    num_rows = len(prompts)
    prompt_lengths_R = np.asarray([len(p) for p in prompts], np.int32)
    inputs_RxL = np.full((num_rows, length), tokenizer.pad_id, np.int32)
    mask_RxL = np.zeros((num_rows, length), np.float32)
    for r, prompt in enumerate(prompts):
        p, n = len(prompt), int(lengths_R[r])
        inputs_RxL[r, :p] = prompt
        inputs_RxL[r, p : p + n] = tokens_RxT[r, :n]
        mask_RxL[r, p - 1 : p - 1 + n] = 1.0  # the positions whose targets are generated
    ends_R = prompt_lengths_R + lengths_R
    segment_ids_RxL = (np.arange(length)[None, :] < ends_R[:, None]).astype(np.int32)
    targets_RxL = np.concatenate(
        [inputs_RxL[:, 1:], np.full((num_rows, 1), tokenizer.pad_id, np.int32)], axis=1
    )
    texts = [
        tokenizer.decode([int(t) for t in tokens_RxT[r, : lengths_R[r] - int(finished_R[r])]])
        for r in range(num_rows)
    ]
    responses = Responses(
        problems=tuple(problems),
        texts=tuple(texts),
        tokens_RxT=tokens_RxT,
        lengths_R=lengths_R.astype(np.int32),
        finished_R=finished_R.astype(bool),
        inputs_RxL=inputs_RxL,
        prompt_lengths_R=prompt_lengths_R,
    )
    zeros_RxL = np.zeros((num_rows, length), np.float32)
    return buffers.Rollout(
        responses=responses,
        group_size=group_size,
        targets_RxL=targets_RxL,
        segment_ids_RxL=segment_ids_RxL,
        response_mask_RxL=mask_RxL,
        old_logprobs_RxL=zeros_RxL,
        ref_logprobs_RxL=zeros_RxL,
        values_RxL=zeros_RxL,
    )


def rollout_metrics(rollout: buffers.Rollout, scored, buffer, tokenizer) -> dict[str, float]:
    """Mean reward and components, accuracy, lengths, entropy proxy, explained variance."""
    from data.format import parse_assistant

    responses = rollout.responses
    thought_tokens, thought_steps = [], []
    for text in responses.texts:
        steps = [s for b in parse_assistant(text).turn.blocks for s in b.thoughts]
        thought_steps.append(len(steps))
        thought_tokens.append(len(tokenizer.encode("\n".join(steps))) if steps else 0)
    mask_RxL = rollout.response_mask_RxL
    metrics = {
        "rollout/reward": float(scored.rewards_RxT.sum(axis=1).mean()),
        "rollout/accuracy": float(scored.correct_R.mean()),
        "rollout/response_tokens": float(responses.lengths_R.mean()),
        "rollout/finished": float(responses.finished_R.mean()),
        "rollout/thought_tokens": float(np.mean(thought_tokens)),
        "rollout/thought_steps": float(np.mean(thought_steps)),
        # -mean log p of the sampled tokens: a one-sample estimate of the policy's entropy.
        "rollout/entropy": float(
            -(rollout.old_logprobs_RxL * mask_RxL).sum() / max(mask_RxL.sum(), 1)
        ),
    }
    for name, sums_R in scored.components.items():
        metrics[f"rollout/reward_{name}"] = float(sums_R.mean())
    if "returns" in buffer:
        metrics["rollout/explained_variance"] = buffers.explained_variance(
            rollout.values_RxL, buffer["returns"], mask_RxL
        )
    return metrics


def producer_factory(kind: str):
    """The train.batches factory `(config, prepared, model) -> RolloutProducer` of `kind`."""

    def make(config, prepared, model) -> RolloutProducer:
        return RolloutProducer(config, prepared, model, kind)

    return make


# ---------------------------------------------------------------------- checkpointing


class RolloutCheckpointHandler(ocp.CheckpointHandler):
    """Saves a producer snapshot per JAX process: arrays to .npz, the rest to .json."""

    def save(self, directory, args: RolloutSave) -> None:
        """Writes this process's snapshot into `directory`."""
        stem = _process_stem()
        with open(directory / f"{stem}.npz", "wb") as f:
            np.savez(f, **args.snapshot["arrays"])
        (directory / f"{stem}.json").write_text(json.dumps(args.snapshot["state"]))

    def restore(self, directory, args: RolloutRestore):
        """Loads this process's snapshot into the producer named by `args`."""
        stem = _process_stem()
        path = directory / f"{stem}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was not written by a rollout producer with "
                f"{jax.process_count()} processes"
            )
        with open(directory / f"{stem}.npz", "rb") as f, np.load(f) as arrays:
            snapshot = {"arrays": {k: arrays[k] for k in arrays.files}}
        snapshot["state"] = json.loads(path.read_text())
        args.producer.load_snapshot(snapshot)
        return args.producer


def _process_stem() -> str:
    """File stem of this JAX process's part of the snapshot."""
    return f"rollout_process_{jax.process_index()}-of-{jax.process_count()}"


@ocp.args.register_with_handler(RolloutCheckpointHandler, for_save=True)
@dataclasses.dataclass
class RolloutSave(ocp.args.CheckpointArgs):
    """Save args: a `RolloutProducer.snapshot()`, taken when the save was requested."""

    snapshot: dict


@ocp.args.register_with_handler(RolloutCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class RolloutRestore(ocp.args.CheckpointArgs):
    """Restore args: the producer to load the snapshot into."""

    producer: Any
