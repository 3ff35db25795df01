"""The run report: `report.md` with plots, from the files a run wrote and nothing else.

    python -m train.report --workdir=DIR [--gather]

Reads DIR's metrics.jsonl, eval.json, config.json, and when present search_eval.json and
redaction_eval.md; writes DIR/report.md and PNGs under DIR/report/:

  training curves  loss and the per-part cross-entropies (ce_headline, ce_thoughts,
                   ce_summary, ce_answer); reward, KL, accuracy and thought-length
                   metrics when logged (reward models, RL rollouts)
  per_task         eval.json's accuracy and well-formed rate per task
  thought length   thought tokens of each sampled response against its correctness (from
                   eval.json `samples`), and per task mean thought tokens against accuracy
  best_of_n        accuracy against N per selection method, and beam searches, from
                   rl.search_eval's search_eval.json

then a few sampled dialogues rendered with their thinking blocks. `--gather` adds a section
for every sibling run workdir (e.g. ../sft, ../orm, ../prm next to ../rl). The trainer calls
`write_report(workdir)` at the end of each run. The workdir may be local or a gs:// URI: every
file goes through `etils.epath`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence

from absl import app, flags
from etils import epath
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from data.format import parse_assistant
from train.metrics import read_metrics
from train.workdir import absolute

REPORT_FILE = "report.md"
PLOTS_DIR = "report"
PART_LOSSES = ("ce_headline", "ce_thoughts", "ce_summary", "ce_answer")
RL_METRIC_RE = re.compile(r"reward|kl|accuracy|thought")  # reward-model and RL metrics
MIN_THOUGHT_SAMPLES = 20  # fewer per-sample points say little about length vs. correctness
NUM_DIALOGUES = 3


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What a run wrote, read back (None or empty where a file is missing)."""

    name: str
    workdir: str
    config: dict | None
    metrics: list[dict]
    eval: dict | None
    search: dict | None
    redaction_md: str | None


def _read_json(path: epath.Path) -> dict | None:
    """A JSON file's object, or None if the file is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run_files(workdir: epath.PathLike) -> RunFiles:
    """Reads the files of one run workdir."""
    path = epath.Path(workdir)
    metrics_path, redaction_path = path / "metrics.jsonl", path / "redaction_eval.md"
    return RunFiles(
        name=path.name,
        workdir=str(workdir),
        config=_read_json(path / "config.json"),
        metrics=read_metrics(metrics_path) if metrics_path.exists() else [],
        eval=_read_json(path / "eval.json"),
        search=_read_json(path / "search_eval.json"),
        redaction_md=redaction_path.read_text() if redaction_path.exists() else None,
    )


def is_run_dir(path: epath.PathLike) -> bool:
    """Whether `path` holds the files of a train.main run."""
    return any((epath.Path(path) / f).exists() for f in ("metrics.jsonl", "eval.json"))


def sibling_runs(workdir: epath.PathLike) -> list[str]:
    """Other run workdirs next to `workdir`, by name."""
    me = absolute(workdir)
    return [
        str(path)
        for path in sorted(me.parent.iterdir(), key=lambda p: p.name)
        if path != me and path.is_dir() and is_run_dir(path)
    ]


# ---------------------------------------------------------------- data for the plots


def series(metrics: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a metric, where it was logged as a finite number."""
    steps, values = [], []
    for record in metrics:
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(record.get("step", len(steps)))
            values.append(float(value))
    return steps, values


def rl_keys(metrics: Sequence[dict]) -> list[str]:
    """Logged metrics about rewards, KL, accuracy and thoughts, in first-seen order."""
    keys: dict[str, None] = {}
    for record in metrics:
        for key, value in record.items():
            if RL_METRIC_RE.search(key) and isinstance(value, int | float):
                keys[key] = None
    return list(keys)


def thought_tokens(response: str, count: Callable[[str], int]) -> int:
    """Thought tokens of a response, as train.evaluate counts them."""
    steps = [s for block in parse_assistant(response).turn.blocks for s in block.thoughts]
    return count("\n".join(steps)) if steps else 0


def thought_points(samples: Sequence[dict], count: Callable[[str], int]) -> list[tuple[int, bool]]:
    """(thought tokens, correct) of each sampled response."""
    return [
        (thought_tokens(s.get("response", ""), count), bool(s.get("correct", 0) > 0))
        for s in samples
        if isinstance(s, dict)
    ]


def best_of_n_curves(search: dict) -> dict[str, tuple[list, list, list | None]]:
    """{method: (N values, mean accuracies, stds or None)} from rl.search_eval's `methods`."""
    curves = {}
    methods = search.get("methods")
    for name, curve in methods.items() if isinstance(methods, dict) else ():
        if not isinstance(curve, dict):
            continue
        n, mean = curve.get("n"), curve.get("mean")
        if isinstance(n, list) and isinstance(mean, list) and n and len(n) == len(mean):
            std = curve.get("std")
            curves[name] = (n, mean, std if isinstance(std, list) and len(std) == len(n) else None)
    return curves


# ---------------------------------------------------------------- plots


def _minor_label(value: float, _) -> str:
    """Labels the minor log ticks at 2 and 5 times a power of ten only, so they never crowd."""
    mantissa = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if mantissa in (2, 5) else ""


def _log_y(ax) -> None:
    """A log y axis with plain tick labels (0.5, not 5x10^-1)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))


def _save(fig: Figure, path: str) -> str:
    """Writes a figure as PNG; returns its path."""
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    return path


def plot_losses(metrics: Sequence[dict], path: str) -> str | None:
    """Loss and the per-part cross-entropies against step."""
    parts = [k for k in PART_LOSSES if series(metrics, k)[0]]
    if not series(metrics, "loss")[0]:
        return None
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_parts = fig.subplots(1, 2)
    for key in ("loss", "ce"):
        steps, values = series(metrics, key)
        if steps:
            ax_loss.plot(steps, values, label=key)
    ax_loss.set(title="training loss", xlabel="step")
    _log_y(ax_loss)
    ax_loss.legend()
    for key in parts:
        ax_parts.plot(*series(metrics, key), label=key.removeprefix("ce_"))
    ax_parts.set(title="cross-entropy per part", xlabel="step")
    if parts:
        _log_y(ax_parts)
        ax_parts.legend()
    else:
        ax_parts.text(
            0.5, 0.5, "no per-part losses logged", ha="center", transform=ax_parts.transAxes
        )
    return _save(fig, path)


def plot_rl_metrics(metrics: Sequence[dict], path: str) -> str | None:
    """One panel per reward, KL, accuracy or thought-length metric."""
    keys = rl_keys(metrics)
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        ax.plot(*series(metrics, key))
        ax.set(title=key, xlabel="step")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_per_task(result: dict, path: str) -> str | None:
    """Accuracy and well-formed rate per task, as bars."""
    per_task = result.get("per_task") if result else None
    if not per_task:
        return None
    tasks = sorted(per_task)
    fig = Figure(figsize=(max(6, 1.2 * len(tasks)), 4))
    ax = fig.subplots()
    width = 0.4
    for offset, key in ((-width / 2, "accuracy"), (width / 2, "well_formed")):
        values = [per_task[t].get(key, 0.0) for t in tasks]
        ax.bar([i + offset for i in range(len(tasks))], values, width, label=key)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set(ylim=(0, 1.05), title=f"greedy evaluation at step {result.get('step', '?')}")
    ax.legend()
    return _save(fig, path)


def plot_thought_length(points, per_task: dict | None, path: str) -> str | None:
    """Per sample: thought tokens by correctness; per task: mean thought tokens vs accuracy."""
    if not points and not per_task:
        return None
    fig = Figure(figsize=(11, 4))
    ax_samples, ax_tasks = fig.subplots(1, 2)
    for x, correct in ((0, False), (1, True)):
        lengths = [n for n, ok in points if ok == correct]
        jitter = [x + 0.15 * ((i * 0.618) % 1 - 0.5) for i in range(len(lengths))]
        ax_samples.scatter(jitter, lengths, alpha=0.6)
    ax_samples.set_xticks([0, 1], ["wrong", "correct"])
    ax_samples.set_xlim(-0.5, 1.5)
    ax_samples.set(title=f"thought tokens per sample ({len(points)})", ylabel="thought tokens")
    for task, row in sorted((per_task or {}).items()):
        ax_tasks.scatter(row.get("mean_thought_tokens", 0.0), row.get("accuracy", 0.0))
        ax_tasks.annotate(task, (row.get("mean_thought_tokens", 0.0), row.get("accuracy", 0.0)))
    ax_tasks.set(
        title="per task", xlabel="mean thought tokens", ylabel="accuracy", ylim=(-0.05, 1.05)
    )
    return _save(fig, path)


def plot_best_of_n(search: dict, path: str) -> str | None:
    """Accuracy against N for each selection method, beam searches as points."""
    curves = best_of_n_curves(search or {})
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for method, (n, mean, std) in curves.items():
        ax.plot(n, mean, "--" if "oracle" in method else "-", marker="o", label=method)
        if std is not None:
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(n, low, high, alpha=0.15)
    for row in search.get("beam_search") or []:
        if isinstance(row, dict) and {"equivalent_n", "accuracy"} <= set(row):
            label = f"beam W={row.get('beam_width', '?')}, C={row.get('num_candidates', '?')}"
            ax.scatter(
                [max(row["equivalent_n"], 1.0)], [row["accuracy"]], marker="*", s=120, label=label
            )
    ax.set_xscale("log", base=2)
    ax.set(
        title="best-of-N", xlabel="N (samples per problem)", ylabel="accuracy", ylim=(-0.02, 1.02)
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------- markdown


def render_sample(sample: dict) -> str:
    """One sampled dialogue in markdown, thinking blocks shown as such."""
    parsed = parse_assistant(sample.get("response", ""))
    verdict = "correct" if sample.get("correct", 0) > 0 else "wrong"
    lines = [
        f"**{sample.get('task', '?')}** ({verdict}; expected `{sample.get('expected')}`)",
        "",
        f"> **User:** {sample.get('prompt', '')}",
        ">",
    ]
    for i, block in enumerate(parsed.turn.blocks, 1):
        lines.append(f"> **Thinking block {i}:** {block.headline}")
        if block.thoughts:
            lines += [">", "> ```text", *(f"> {step}" for step in block.thoughts), "> ```"]
        lines += [">", f"> **Summary:** {block.summary}", ">"]
    visible = parsed.turn.content.strip() or "(no visible answer)"
    lines += [
        f"> **Assistant:** {line}" if i == 0 else f"> {line}"
        for i, line in enumerate(visible.split("\n"))
    ]
    if parsed.problems:
        lines += ["", f"Format problems: {'; '.join(parsed.problems)}."]
    return "\n".join(lines)


def _link(path: str | None, base: str, title: str) -> list[str]:
    """A markdown image line for a written plot (which lies under `base`)."""
    return [f"![{title}]({epath.Path(path).relative_to(base)})", ""] if path else []


def _header(files: RunFiles) -> list[str]:
    """The run's name, objective, model and final evaluation numbers."""
    config, result = files.config or {}, files.eval or {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    last = files.metrics[-1].get("step", "?") if files.metrics else "-"
    lines = [
        f"## {files.name}",
        "",
        f"- objective `{config.get('objective', '?')}`, model `{model.get('preset', '?')}`, "
        f"{len(files.metrics)} logged steps (last: {last})",
    ]
    scalars = {k: v for k, v in result.items() if isinstance(v, int | float)}
    if scalars:
        lines.append("- evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    return lines + [""]


def _evaluation(result: dict, plot, base: str, count: Callable[[str], int]) -> list[str]:
    """Per-task accuracy and thought length against correctness, from eval.json."""
    lines = []
    per_task, samples = result.get("per_task"), result.get("samples") or []
    if per_task:
        lines += ["### Accuracy per task", ""]
        lines += _link(plot_per_task(result, plot("per_task")), base, "per-task accuracy")
    # eval.json lists every problem's thought length and verdict; older files only samples.
    rows = result.get("per_problem")
    if rows:
        points = [(int(r["thought_tokens"]), bool(r["correct"] > 0)) for r in rows]
    else:
        points = thought_points(samples, count)
    if points or per_task:
        lines += ["### Thought length and correctness", ""]
        drawn = plot_thought_length(points, per_task, plot("thoughts"))
        lines += _link(drawn, base, "thought length")
    if len(points) < MIN_THOUGHT_SAMPLES and (points or per_task):
        lines += [
            f"Only {len(points)} sampled responses in eval.json (at least "
            f"{MIN_THOUGHT_SAMPLES} are needed to read much into thought length against "
            "correctness); the per-task panel uses every evaluated problem.",
            "",
        ]
    return lines


def run_section(
    files: RunFiles, plots_dir: str, base: str, count: Callable[[str], int]
) -> list[str]:
    """The markdown of one run, writing its plots into `plots_dir`."""
    epath.Path(plots_dir).mkdir(parents=True, exist_ok=True)

    def plot(name: str) -> str:
        return str(epath.Path(plots_dir) / f"{files.name}_{name}.png")

    lines = _header(files) + ["### Training curves", ""]
    drawn = plot_losses(files.metrics, plot("losses"))
    lines += _link(drawn, base, "losses") or ["No loss curve: no metrics.jsonl records.", ""]
    drawn = plot_rl_metrics(files.metrics, plot("rewards"))
    lines += _link(drawn, base, "reward, KL, accuracy, thought length")
    lines += _evaluation(files.eval or {}, plot, base, count)
    if files.search is not None:
        lines += ["### Best-of-N", ""]
        drawn = plot_best_of_n(files.search, plot("best_of_n"))
        keys = sorted(files.search)
        lines += _link(drawn, base, "best-of-N") or [f"No `methods` curves in {keys}.", ""]
    if files.redaction_md:
        lines += ["### Redaction", "", files.redaction_md.replace("# Redaction", "Redaction", 1)]
    samples = (files.eval or {}).get("samples") or []
    if samples:
        lines += ["### Sampled dialogues", ""]
        for sample in samples[:NUM_DIALOGUES]:
            lines += [render_sample(sample), ""]
    return lines


def _token_counter(workdir: epath.PathLike) -> Callable[[str], int]:
    """Counts tokens with the run's tokenizer, or words when it has none."""
    path = epath.Path(workdir) / "tokenizer.model"
    if path.exists():
        from data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_proto(path.read_bytes())
        return lambda text: len(tokenizer.encode(text))
    return lambda text: len(text.split())


def write_report(workdir: epath.PathLike, gather: bool = False) -> str:
    """Writes `workdir/report.md` and its plots; returns the report's path."""
    base = epath.Path(workdir)
    if not base.is_dir():
        raise FileNotFoundError(f"{workdir} is not a directory: pass a train.main workdir")
    runs = [str(workdir)] + (sibling_runs(workdir) if gather else [])
    lines = [f"# Report: {base.name}", ""]
    if gather:
        lines += ["Runs: " + ", ".join(f"`{epath.Path(r).name}`" for r in runs), ""]
    for run in runs:
        lines += run_section(
            load_run_files(run), str(base / PLOTS_DIR), str(base), _token_counter(run)
        )
    path = base / REPORT_FILE
    # Local files are renamed into place; a cloud object appears whole anyway.
    tmp = path.with_name(f"{REPORT_FILE}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(path)
    return str(path)


def main(argv):
    """Writes the report of --workdir and prints its path."""
    del argv
    print(write_report(flags.FLAGS.workdir, gather=flags.FLAGS.gather))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A train.main workdir.", required=True)
    flags.DEFINE_bool("gather", False, "Also report the sibling stage workdirs (../sft, ...).")
    app.run(main)
