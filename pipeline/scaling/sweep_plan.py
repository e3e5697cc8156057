"""Plan a sweep around a prior's optimum, and turn a fit into a model to train.

`plan_grid`: for each compute budget C, the prior's compute-optimal N*(C) (a previous fit, or published
parameters) is the centre of `sizes` model sizes spaced evenly in log N over `span` decades (on a lattice shared by all budgets,
so that neighbouring budgets share sizes and WSD branches can train them once); each target is
snapped to the nearest width of the shape rule (pipeline.scaling.shapes: widths in steps of head_dim, exact
parameter counts of the built model) and trained on D = C / (6 N) tokens. Snapping can merge or shift sizes,
so the grid is then widened by neighbouring widths until it has at least three sizes and its smallest and
largest sizes bracket N*(C): approach 2 needs a minimum inside the sizes, and a grid that misses it wastes the
budget (the fit's edge diagnostic says so after the fact; the plan avoids it before).

Learning rates (`lr_for`): with µP (model.mup_base_width set) one train.lr serves every width, which is what
µP is for. Without it the width rule lr(d) = train.lr * base_width / d, with base_width the smallest width of
the plan: train.lr is taken as tuned at the smallest model, and the peak rate falls as 1/width, µP's rule
for Adam on hidden matrices applied to the whole standard-parametrised model (the direction of the tuned
optima in Kaplan et al. 2020, App. D.6, and Porian et al. 2024, without their fitted constants).

`recommend`: the compute-optimal N and D at C with bootstrap intervals from an approach-3 fit, as a model of
the shape rule and a training config (steps of train.global_batch_tokens, warm-up, the width rule's lr),
written as a Hydra config file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from pipeline.cluster.storage import NO_MIRROR, Mirror
from pipeline.config import ModelConfig, PipelineConfig, SweepConfig, SweepRun
from pipeline.scaling.approach3 import ChinchillaFit, compute_optimal_interval
from pipeline.scaling.fit_files import fit_file

# Published approach-3 fits, usable as priors: L(N, D) = E + A / N^alpha + B / D^beta (nats/token).
PRIORS = {
    "chinchilla": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),  # Hoffmann et al. 2022, eq. 10
    "epoch": dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),  # Besiroglu et al. 2024 refit
}


def load_fit(source: str, output_dir: str | Path = "outputs",
             mirror: Mirror = NO_MIRROR) -> tuple[ChinchillaFit, Path | None]:
    """An approach-3 fit: a published prior by name (PRIORS), `latest` (the last `pipeline scaling fit` or sweep
    under output_dir, or in the store of `mirror`), or a scaling_fit.json. Returns the fit (with its bootstrap
    replicates when the file has them) and the file it came from (None for a published prior)."""
    if source in PRIORS:
        return ChinchillaFit(**PRIORS[source], objective=float("nan"), n_points=0), None
    path = fit_file(source, output_dir, mirror)
    if not path.is_file():
        raise ValueError(f"{source!r} is neither a published prior ({', '.join(PRIORS)}), `latest`, nor a "
                         f"scaling_fit.json")
    report = json.loads(path.read_text())
    a3 = report.get("approach3", {})
    if not a3 or "error" in a3:
        raise ValueError(f"{path} holds no approach-3 fit ({a3.get('error', 'missing')}): fit more runs, or "
                         f"use prior=chinchilla")
    fit = ChinchillaFit(E=a3["E"], A=a3["A"], B=a3["B"], alpha=a3["alpha"], beta=a3["beta"],
                        objective=a3["objective"], n_points=a3["n_points"], confidence=a3.get("confidence", 0.95))
    fit.bootstrap_params = report.get("bootstrap_params", [])
    return fit, path


# ------------------------------------------------------------------------------------------ sizes


class WidthLattice:
    """The shape rule's widths (multiples of head_dim) with exact parameter counts of the built model."""

    def __init__(self, base: ModelConfig, sweep: SweepConfig, vocab_size: int):
        self.base, self.sweep, self.vocab_size = base, sweep, vocab_size
        self._counts: dict[int, int] = {}

    def model(self, width: int) -> ModelConfig:
        from pipeline.scaling.sweep import shape_for_width

        return dataclasses.replace(shape_for_width(self.base, width, self.sweep), vocab_size=self.vocab_size)

    def params(self, width: int) -> int:
        from pipeline.model.size import count_parameters

        if width not in self._counts:
            self._counts[width] = count_parameters(self.model(width)).total
        return self._counts[width]

    def nearest(self, n_params: float) -> int:
        """The width whose parameter count is nearest n_params in log space."""
        step = self.sweep.head_dim
        width = step
        while self.params(width) < n_params:
            width += step
        below = width - step
        if below >= step and math.log(n_params / self.params(below)) < math.log(self.params(width) / n_params):
            return below
        return width


@dataclasses.dataclass
class PlannedRun:
    budget: float
    width: int
    n_params: int
    tokens: int
    steps: int
    lr: float
    n_opt: float  # the prior's compute-optimal N at this budget

    @property
    def compute(self) -> float:
        return 6.0 * self.n_params * self.tokens


def size_targets(n_opt: float, sizes: int, span: float) -> list[float]:
    """`sizes` parameter counts spaced span / (sizes - 1) decades apart around n_opt, taken from one lattice
    (powers of 10 in those steps) shared by every budget: neighbouring budgets then train some of the same
    sizes, which WSD branches train once."""
    if sizes == 1:
        return [n_opt]
    step = span / (sizes - 1)
    first = round(math.log10(n_opt) / step - (sizes - 1) / 2)
    return [10 ** ((first + i) * step) for i in range(sizes)]


def budget_widths(lattice: WidthLattice, n_opt: float, sizes: int, span: float) -> list[int]:
    """Widths around n_opt: the targets snapped, then widened until >= min(3, sizes) widths bracket n_opt."""
    widths = sorted({lattice.nearest(n) for n in size_targets(n_opt, sizes, span)})
    step = lattice.sweep.head_dim
    while (lattice.params(widths[0]) > n_opt or len(widths) < min(3, sizes)) and widths[0] > step:
        widths.insert(0, widths[0] - step)
    while lattice.params(widths[-1]) < n_opt or len(widths) < min(3, sizes):
        widths.append(widths[-1] + step)
    return widths


def lr_for(cfg: PipelineConfig, width: int, base_width: int) -> float:
    """The peak learning rate of a width (see the module docstring): train.lr under µP, else the width rule."""
    if cfg.model.mup_base_width is not None:
        return cfg.train.lr
    return cfg.train.lr * base_width / width


def plan_grid(cfg: PipelineConfig, prior: ChinchillaFit, budgets: list[float], vocab_size: int, sizes: int = 5,
              span: float = 1.0) -> list[PlannedRun]:
    """The runs of an IsoFLOP sweep centred on the prior's optimum at each budget (module docstring)."""
    if sizes < 1 or span <= 0:
        raise ValueError(f"sizes={sizes} must be >= 1 and span={span} decades > 0")
    lattice = WidthLattice(cfg.model, cfg.sweep, vocab_size)
    batch = cfg.train.global_batch_tokens
    chosen = []
    for C in sorted(budgets):
        if C <= 0:
            raise ValueError(f"budget {C} FLOPs must be positive")
        n_opt = prior.compute_optimal(C)[0]
        chosen += [(C, n_opt, w) for w in budget_widths(lattice, n_opt, sizes, span)]
    base_width = cfg.sweep.lr_base_width or min(w for _, _, w in chosen)
    runs = []
    for C, n_opt, width in chosen:
        n = lattice.params(width)
        steps = max(1, round(C / (6 * n) / batch))
        runs.append(PlannedRun(C, width, n, steps * batch, steps, lr_for(cfg, width, base_width), n_opt))
    return runs


def estimate_seconds(cfg: PipelineConfig, runs: list[PlannedRun], peak_tflops: float, mfu: float,
                     overhead_s: float, branches: bool) -> float:
    """Wall time of the sweep on cfg.parallel.num_workers workers: each run's training FLOPs (attention
    included) at mfu of the peak, plus a fixed start-up and evaluation overhead per run. With branches a
    size's shorter budgets only train their decay."""
    from pipeline.model.size import training_flops_per_token

    lattice = WidthLattice(cfg.model, cfg.sweep, vocab_of(cfg))
    rate = peak_tflops * 1e12 * mfu * cfg.parallel.num_workers
    return sum(training_flops_per_token(lattice.model(run.width)) * trained_steps(cfg, run, runs, branches)
               * cfg.train.global_batch_tokens / rate + overhead_s for run in runs)


def trained_steps(cfg: PipelineConfig, run: PlannedRun, runs: list[PlannedRun], branches: bool) -> int:
    """The steps a planned run trains: all of them, or with branches only its decay unless it is its size's
    longest run (the trunk), as pipeline.scaling.sweep trains them."""
    from pipeline.config import wsd_decay_start

    longest = max(r.steps for r in runs if r.width == run.width and r.lr == run.lr)
    if branches and run.steps < longest:
        return run.steps - wsd_decay_start(run.steps, cfg.train.decay_fraction)
    return run.steps


def vocab_of(cfg: PipelineConfig) -> int:
    """The vocabulary the models will have: model.vocab_size, or the tokenizer's size it follows."""
    return cfg.model.vocab_size or cfg.data.tokenizer.vocab_size


# ----------------------------------------------------------------------------------- config files


CONFIG_SECTIONS = ("model", "data", "train", "eval")


def _differences(now: dict, default: dict) -> dict:
    out = {}
    for key, value in now.items():
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            nested = _differences(value, default[key])
            if nested:
                out[key] = nested
        elif default.get(key, object()) != value:
            out[key] = value
    return out


def config_overrides(cfg: PipelineConfig) -> dict:
    """The model, data, train and eval values of cfg that differ from what `pipeline <stage>` composes with
    no overrides: a config file holding them reproduces cfg's setting (vocabulary, context, batch, data)."""
    from pipeline.compose import compose_config

    default = dataclasses.asdict(compose_config([f"output_dir={cfg.output_dir}"], stage="params"))
    now = dataclasses.asdict(cfg)
    return _differences({k: now[k] for k in CONFIG_SECTIONS}, {k: default[k] for k in CONFIG_SECTIONS})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(path: Path, header: str, values: dict) -> Path:
    """A Hydra config file of the _global_ package (its keys merge into the whole config). Credentials in URIs are
    written as *** (pipeline.redaction): the file is shared and kept; they come from the command line or the
    environment when it runs."""
    from omegaconf import OmegaConf

    from pipeline.redaction import redact_values, scrub

    path.parent.mkdir(parents=True, exist_ok=True)
    comments = "".join(f"# {line}\n" for line in scrub(header).splitlines())
    path.write_text(f"# @package _global_\n{comments}{OmegaConf.to_yaml(redact_values(values))}")
    return path


def config_dir_of(cfg: PipelineConfig) -> Path:
    """Where plan and recommend write their Hydra config files: a config directory for `--config-dir`."""
    return Path(cfg.output_dir) / "scaling" / "configs"


def write_sweep_config(cfg: PipelineConfig, runs: list[PlannedRun], name: str, branches: bool, header: str) -> Path:
    """conf-style sweep group file <config dir>/sweep/<name>.yaml listing the planned runs (sweep.kind=points)."""
    base_width = cfg.sweep.lr_base_width or min(r.width for r in runs)
    sweep = {"name": name, "kind": "points", "branches": branches, "aspect_ratio": cfg.sweep.aspect_ratio,
             "lr_base_width": base_width,
             "head_dim": cfg.sweep.head_dim, "predict_flops": list(cfg.sweep.predict_flops),
             "n_bootstrap": cfg.sweep.n_bootstrap,
             "runs": [dataclasses.asdict(SweepRun(r.width, r.tokens, r.budget, float(f"{r.lr:.6g}"))) for r in runs]}
    values = _merge(config_overrides(cfg), {"sweep": sweep, "train": {"schedule": "wsd"} if branches else {}})
    values["sweep"] = sweep  # the plan's, not whatever sweep the overrides started from
    return write_config(config_dir_of(cfg) / "sweep" / f"{name}.yaml", header, values)


# -------------------------------------------------------------------------------------- recommend


@dataclasses.dataclass
class Recommendation:
    C: float
    n_opt: float
    d_opt: float
    intervals: dict  # N_opt, D_opt, loss -> (lo, hi) over the fit's bootstrap ({} without one)
    model: ModelConfig  # the shape rule's model nearest N_opt
    n_params: int
    steps: int
    tokens: int
    lr: float
    warmup: int
    loss: float  # the fit's loss at the model and tokens trained (not at the unrounded optimum)
    loss_interval: tuple[float, float] | None

    def summary(self) -> str:
        def iv(key: str, fmt: str) -> str:
            pair = self.intervals.get(key)
            return f" [{pair[0]:{fmt}}, {pair[1]:{fmt}}]" if pair else ""

        loss_iv = f" [{self.loss_interval[0]:.4f}, {self.loss_interval[1]:.4f}]" if self.loss_interval else ""
        m = self.model
        return (f"C={self.C:.3g} FLOPs: N_opt={self.n_opt:.4g}{iv('N_opt', '.3g')} params, "
                f"D_opt={self.d_opt:.4g}{iv('D_opt', '.3g')} tokens\n"
                f"  model: n_layer={m.n_layer} d_model={m.d_model} n_head={m.n_head} d_ff={m.d_ff} "
                f"({self.n_params:,} parameters)\n"
                f"  train: {self.steps} steps of {self.tokens // self.steps:,} tokens = {self.tokens:,} tokens, "
                f"lr {self.lr:.3g}, warm-up {self.warmup}\n"
                f"  predicted validation loss at that N and D: {self.loss:.4f}{loss_iv}")


def loss_interval(fit: ChinchillaFit, n: float, d: float) -> tuple[float, float] | None:
    """The percentile interval of L(n, d) over the fit's bootstrap replicates (None without replicates)."""
    import numpy as np

    boots = fit.bootstrap_fits()
    if not boots:
        return None
    values = np.array([b.loss(n, d) for b in boots], dtype=float)
    q = 100 * (1 - fit.confidence) / 2
    lo, hi = np.nanpercentile(values, [q, 100 - q])
    return float(lo), float(hi)


def base_width_for(cfg: PipelineConfig, report_points: list[dict] | None) -> int:
    """The width rule's anchor for a recommendation: sweep.lr_base_width (a planned sweep's file sets it),
    else the smallest model the fit saw (the plan's default anchor), else model.d_model."""
    if cfg.sweep.lr_base_width:
        return cfg.sweep.lr_base_width
    if report_points:
        return WidthLattice(cfg.model, cfg.sweep, vocab_of(cfg)).nearest(min(p["N"] for p in report_points))
    return cfg.model.d_model


def recommend(cfg: PipelineConfig, fit: ChinchillaFit, C: float, base_width: int | None = None) -> Recommendation:
    """The compute-optimal model and training run at C FLOPs (module docstring). base_width anchors the
    learning-rate width rule (default: cfg.model.d_model; see base_width_for)."""
    from pipeline.scaling.sweep import default_warmup

    n_opt, d_opt, _ = fit.compute_optimal(C)
    if not (math.isfinite(n_opt) and math.isfinite(d_opt)) or n_opt <= 0:
        raise ValueError(f"the fit gives no finite optimum at C={C:g}: N_opt={n_opt}, D_opt={d_opt}")
    lattice = WidthLattice(cfg.model, cfg.sweep, vocab_of(cfg))
    width = lattice.nearest(n_opt)
    n = lattice.params(width)
    batch = cfg.train.global_batch_tokens
    steps = max(2, round(C / (6 * n) / batch))
    model = dataclasses.replace(lattice.model(width), name=f"opt-C{C:.0e}".replace("+", ""))
    return Recommendation(
        C=C, n_opt=n_opt, d_opt=d_opt, intervals=compute_optimal_interval(fit, C), model=model, n_params=n,
        steps=steps, tokens=steps * batch, lr=lr_for(cfg, width, base_width or cfg.model.d_model),
        warmup=default_warmup(steps), loss=float(fit.loss(n, steps * batch)),
        loss_interval=loss_interval(fit, n, steps * batch))


def recommended_config(cfg: PipelineConfig, rec: Recommendation) -> PipelineConfig:
    """cfg with the recommended model and training length (what `pipeline train` composes from the file)."""
    train = dataclasses.replace(cfg.train, max_steps=rec.steps, warmup_steps=rec.warmup, lr=rec.lr)
    return dataclasses.replace(cfg, model=rec.model, train=train, run_name=rec.model.name)


def write_recommendation(cfg: PipelineConfig, rec: Recommendation, source: str) -> Path:
    """<config dir>/recommended/<name>.yaml: train it with
    `pipeline train --config-dir <config dir> +recommended=<name>`."""
    m = rec.model
    values = _merge(config_overrides(cfg), {
        "model": {"name": m.name, "n_layer": m.n_layer, "d_model": m.d_model, "n_head": m.n_head, "d_ff": m.d_ff},
        "train": {"max_steps": rec.steps, "warmup_steps": rec.warmup, "lr": float(f"{rec.lr:.6g}"),
                  "global_batch_tokens": cfg.train.global_batch_tokens},
        "run_name": m.name,
    })
    header = f"Recommended by `pipeline scaling recommend` from {source}\n" + rec.summary()
    return write_config(config_dir_of(cfg) / "recommended" / f"{m.name}.yaml", header, values)
