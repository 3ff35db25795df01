"""The one trainer loop. Every objective runs through `run`; none is special-cased here.

    state, batches  <- restore the last checkpoint, or init (from config.init_from)
    for step in range(start, num_steps):
        batch   = producer.next(state)            # Grain, or a rollout phase for RL
        state   = jitted_step(state, batch)       # dispatched; the device runs ahead
        log the previous step's metrics           # host read of step n-1, NaN check
        checkpoint / evaluate at their intervals
    final checkpoint, evaluation -> eval.json

The train step is pure and jitted once with the state's shardings and the state donated.
Host reads happen one step late, so Python never stalls the device.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from model import sharding as sharding_lib
from model.transformer import Transformer
from train import batches as batches_lib
from train import checkpoint, init_from
from train import metrics as metrics_lib
from train import workdir as workdir_lib
from train.objectives import get_objective
from train.optim import make_optimizer
from train.state import init_state, param_shardings, state_shardings
from train.step import train_step


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stopped without saving the bad state."""


@dataclasses.dataclass
class Setup:
    """Everything `run` builds before the first step."""

    model_cfg: object
    model: Transformer
    prepared: object
    mesh: jax.sharding.Mesh
    rules: tuple


def build(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Resolves the objective, data, tokenizer, model config and mesh for a run."""
    from data.build import prepare

    objective = get_objective(config.objective)
    source = init_from.find_source(config.init_from, config.init_from_step)
    init_from.prepare_tokenizer(source, workdir)
    prepared = prepare(config.data, workdir)
    vocab = prepared.tokenizer.vocab_size
    model_cfg = init_from.source_model_config(
        source, config.model, vocab
    ) or workdir_lib.resolve_model_config(config.model, vocab)
    if model_cfg.vocab_size < vocab:
        raise ValueError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab}"
        )
    model = Transformer(model_cfg, heads=objective.heads)
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    rules = sharding_lib.get_rules(config.sharding_rules)
    return Setup(model_cfg, model, prepared, mesh, rules)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.objective` in `workdir` (resuming if it holds a checkpoint)."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or gs://...
    objective = get_objective(config.objective)
    setup = build(config, workdir)
    workdir_lib.write_config(workdir, workdir_lib.resolved_config(config, setup.model_cfg))
    logging.info("Model %s: %.2fM parameters", setup.model_cfg, setup.model_cfg.num_params() / 1e6)

    model, mesh = setup.model, setup.mesh
    producer = batches_lib.make_producer(objective.batches, config, setup.prepared, model)
    abstract_params, p_shardings = param_shardings(model, mesh, setup.rules)
    tx, schedule = make_optimizer(config.optimizer, config.num_steps, abstract_params)
    abstract_state, shardings = state_shardings(abstract_params, p_shardings, tx, mesh)
    unsaved = [
        s
        for s in config.keep_steps
        if s <= config.num_steps and s % config.checkpoint_every and s != config.num_steps
    ]
    if unsaved:
        raise ValueError(
            f"keep_steps {unsaved} are never saved: make them multiples of "
            f"checkpoint_every={config.checkpoint_every}"
        )
    manager = checkpoint.make_manager(
        workdir,
        keep=config.keep_checkpoints,
        keep_steps=tuple(config.keep_steps),
        async_save=config.async_checkpoint,
    )
    try:
        state = _restore_or_init(config, setup, manager, producer, tx, abstract_state, shardings)
        step_fn = jax.jit(
            functools.partial(
                train_step,
                loss_fn=objective.make_loss(config, model),
                tx=tx,
                schedule=schedule,
                accum_steps=config.grad_accum_steps,
            ),
            in_shardings=(shardings, None),  # batches arrive placed by batches.to_global
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        # The rules must be active while the step and the sampler trace, so that the
        # model's activation constraints name mesh axes.
        with sharding_lib.use_rules(mesh, setup.rules):
            return _loop(config, workdir, setup, objective, state, step_fn, producer, manager)
    finally:
        manager.wait_until_finished()
        manager.close()


def _restore_or_init(config, setup, manager, producer, tx, abstract_state, shardings):
    """The latest checkpoint (with the producer's position), else a fresh sharded state."""
    if manager.latest_step() is not None:
        logging.info("Resuming from checkpoint step %d", manager.latest_step())
        return checkpoint.restore(manager, abstract_state, producer.restore_args())
    source = init_from.find_source(config.init_from, config.init_from_step)
    trunk = None
    if source is not None:
        trunk = init_from.load_params(source, setup.model_cfg, abstract_state.params)
        logging.info("Initialized parameters from %s", source.path)
    return init_state(setup.model, tx, config.seed, shardings, params=trunk)


def _loop(config, workdir, setup: Setup, objective, state, step_fn, producer, manager) -> dict:
    """Steps from the state's step to config.num_steps; returns the final evaluation."""
    start = int(state.step)  # one host read, before anything is in flight
    writer = metrics_lib.MetricsWriter(
        workdir, total_steps=config.num_steps, start_step=start, progress=config.progress_bar
    )
    logger = _StepLogger(config, setup.model_cfg, workdir, writer, manager, start)
    evaluator = _Evaluator(config, setup, objective, workdir, writer)
    try:
        for step in range(start, config.num_steps):
            local = producer.next(state)
            if step == start and jax.process_count() > 1:
                _log_row_digests(local)
            batch = batches_lib.to_global(local, setup.mesh, setup.rules)
            state, step_metrics = step_fn(state, batch)
            # Log step n-1 while step n runs; the tokens count padding too (MFU numerator).
            logger.push(
                step + 1,
                step_metrics,
                int(np.prod(local["inputs"].shape)),
                producer.host_metrics(),
            )
            done = step + 1
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                logger.flush()  # never save a state whose loss was not checked
                checkpoint.save(manager, done, state, producer.save_args())
            if config.eval_every and done % config.eval_every == 0 and done < config.num_steps:
                evaluator(state.params, done)
        logger.flush()
        manager.wait_until_finished()
        result = evaluator(state.params, config.num_steps)
        _write_report(workdir)
        return result
    finally:
        writer.close()


class _StepLogger:
    """Holds the in-flight step's metrics and logs them once the next step is dispatched."""

    def __init__(self, config, model_cfg, workdir, writer, manager, start: int):
        self.config, self.workdir, self.writer, self.manager = config, workdir, writer, manager
        self.peak = metrics_lib.measure_matmul_peak()
        self.flops_per_token = model_cfg.flops_per_token(config.data.seq_len)
        self.pending = None
        self.window = _Window(last_step=start)

    def push(self, step: int, device_metrics, local_tokens: int, host_metrics: dict) -> None:
        """Logs the previous step, then keeps this one pending."""
        self.flush()
        self.pending = (step, device_metrics, local_tokens * jax.process_count(), host_metrics)

    def flush(self) -> None:
        """Logs the pending step, if any (blocks until that step is done)."""
        if self.pending is not None:
            _log(
                self.writer,
                self.pending,
                self.window,
                self.config,
                self.peak,
                self.flops_per_token,
                self.workdir,
                self.manager,
            )
            self.pending = None


@dataclasses.dataclass
class _Window:
    """Wall time between consecutive logged steps, for throughput."""

    last_step: int  # the step logged last (the start step before any)
    last_time: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0


def _write_report(workdir: str) -> None:
    """Writes report.md and its plots (process 0); a plotting failure never fails a run."""
    if jax.process_index() != 0:
        return
    from train.report import write_report

    try:
        logging.info("Report: %s", write_report(workdir))
    except Exception:  # noqa: BLE001 - the run itself succeeded; say why the report did not
        logging.exception("Could not write the report for %s", workdir)


def _log_row_digests(local: dict) -> None:
    """Logs a short hash of each input row, so a multi-host run shows its hosts' rows differ."""
    digests = [hashlib.sha1(row.tobytes()).hexdigest()[:12] for row in np.asarray(local["inputs"])]
    logging.info(
        "Process %d of %d, first batch rows: %s",
        jax.process_index(),
        jax.process_count(),
        " ".join(digests),
    )


def _log(writer, pending, window: _Window, config, peak, flops_per_token, workdir, manager):
    """Reads one finished step's metrics on the host, checks them, and logs them."""
    step, device_metrics, tokens, host_metrics = pending
    values = jax.device_get(device_metrics)  # waits for that step only
    loss = float(values["loss"])
    if not math.isfinite(loss):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"The loss became {loss} at step {step}. The run stopped before saving that state; "
            f"the last good checkpoint (step {manager.latest_step()}) in "
            f"{os.path.join(workdir, 'checkpoints')} is untouched. Lower optimizer.lr, raise "
            "optimizer.warmup_steps, or check the data, then start the same command again."
        )
    window.tokens += tokens
    if step % config.log_every and step != config.num_steps:
        return
    now = time.perf_counter()
    elapsed = now - window.last_time
    record = {k: float(v) for k, v in values.items()} | dict(host_metrics)
    record["tokens_per_sec"] = window.tokens / max(elapsed, 1e-9)
    record["mfu"] = record["tokens_per_sec"] * flops_per_token / peak
    record["step_time"] = elapsed / max(step - window.last_step, 1)
    writer.write(step, record)
    window.last_time, window.last_step, window.tokens = now, step, 0


class _Evaluator:
    """Runs the objective's evaluation and writes eval.json (process 0)."""

    def __init__(self, config, setup: Setup, objective, workdir: str, writer):
        from train.evaluate import make_evaluation

        self.eval_fn = make_evaluation(
            objective.evaluation, config, setup.prepared, setup.model_cfg, setup.model
        )
        self.workdir, self.writer = workdir, writer
        # Every process scores every generation, so with several processes the evaluation
        # keeps whole batches on each of them: rows split over hosts could not be fetched.
        self.mesh, self.rules = setup.mesh, setup.rules
        if jax.process_count() > 1:
            self.rules = tuple(rule for rule in setup.rules if rule[0] != "batch")

    def __call__(self, params, step: int) -> dict:
        from train.evaluate import scalar_summary, write_eval

        with sharding_lib.use_rules(self.mesh, self.rules):
            result = self.eval_fn(params, step)
        if jax.process_index() == 0:
            write_eval(self.workdir, result, step)
            summary = scalar_summary(result)
            self.writer.write_summary(step, "eval", summary)
            print(f"eval at step {step}: {summary}")
        return result
