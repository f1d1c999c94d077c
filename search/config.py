"""The run config: one pydantic tree, validated once, loaded from YAML by `load_config`.

    merge-search run configs/demo.yaml

Every model is frozen and forbids unknown keys, so a misspelt key is an error, not a silent
default. `load_config` turns any validation failure into one `ConfigError` line that names the
file, the field path and the value received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search.errors import ConfigError, field_path
from search.methods import LEARNABLE, METHODS, baseline_methods, parameter_free
from search.yamlfile import read_yaml

# The demo config, used when `merge-search run` gets no argument.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelSpec(_Model):
    name: str = Field(min_length=1)  # short label used in tables and parameter names
    path: str = Field(min_length=1)  # local folder, hub id already cached, or demo:<name>


Method = Literal[tuple(METHODS)]  # the registry's names, in its order (search/methods/__init__.py)


class MergeSpec(_Model):
    method: Method = "linear"
    base_model: str | None = None  # the model the variants were tuned from (task-vector methods)
    normalize: bool | None = None  # divide by the sum of the weights; null = the method's default
    granularity: int = Field(default=0, ge=0)  # 0: one weight set; K: one per group of K layers
    filters: list[str] = []  # substrings (self_attn, mlp, ...) with weight sets of their own
    weight_range: tuple[float, float] = (0.0, 1.0)  # searched weights, methods that don't normalize
    density_range: tuple[float, float] | None = None  # searched densities; null: the method's own range
    lambda_: float = Field(default=1.0, alias="lambda")  # task-vector scale (fixed)
    ranges: dict[str, tuple[float, float]] = {}  # search ranges of the method's other parameters (epsilon, t...)

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        if METHODS[self.method].base_unsupported and self.base_model:
            raise ValueError(f"base_model: {self.method} with a base (mergekit's task-vector mode) is not supported "
                             "by merge-search; drop base_model")
        if METHODS[self.method].base_row and not self.base_model:
            raise ValueError(f"method {self.method} needs base_model (the model the variants were fine-tuned from)")
        if self.density_range is not None:
            lo, hi = self.density_range
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"density_range must satisfy 0 < low <= high <= 1 but got {list(self.density_range)}")
        if self.weight_range[0] > self.weight_range[1]:
            raise ValueError(f"weight_range must be [low, high] with low <= high but got {list(self.weight_range)}")
        spec = METHODS[self.method]
        searched = (*spec.searched_model_params, *spec.searched_shared_params)
        for key, (lo, hi) in self.ranges.items():
            if key not in searched or key in ("weight", "density"):
                others = [k for k in searched if k not in ("weight", "density")]
                hint = "use weight_range / density_range" if key in ("weight", "density") else \
                    f"its searched parameters: {', '.join(others) or 'none'}"
                raise ValueError(f"ranges.{key}: not a searched parameter of {self.method} ({hint})")
            if lo > hi:
                raise ValueError(f"ranges.{key} must be [low, high] with low <= high but got {[lo, hi]}")
        if spec.check_ranges is not None:
            effective = spec.search_ranges({**self.ranges, **({"density": self.density_range} if self.density_range else {})})
            problem = spec.check_ranges(effective)
            if problem:
                raise ValueError(problem)
        if len(set(self.filters)) != len(self.filters) or not all(self.filters):
            raise ValueError(f"filters must be distinct non-empty strings but got {self.filters}")
        return self


class ObjectiveSpec(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")  # column name on the leaderboard
    suite: str | None = None  # default: eval.suite
    tasks: list[str] | None = None  # a subset of the suite's tasks; default: all of them
    split: str | None = None  # default: eval.search_split


class ConstraintSpec(_Model):
    objective: str  # an objective's name
    min: float  # feasible when the objective's value is at least this


class EvalSpec(_Model):
    suite: str = "demo"  # a built-in suite name or a path to a suite.yaml / suite folder
    search_split: str = "dev"  # the split the study optimizes
    test_split: str | None = "test"  # held-out split re-scored for the leaderboard; null = none
    rescore_top: int = Field(default=3, ge=0)  # top candidates re-scored on test_split
    batch_size: int = Field(default=32, ge=1)
    system: str | None = None  # system prompt for every task that sets none (chat templates only)
    chat: bool | None = None  # true/false: the tokenizer's chat template for every task/none; null: as the suite says
    # what the study optimises: each task's primary metric (acc, ...) or its smooth one
    # (answer_logprob for choice tasks); the leaderboard shows the primary metric either way
    search_metric: Literal["primary", "smooth"] = "primary"
    objectives: list[ObjectiveSpec] | None = None  # two or more: a multi-objective study
    constraints: list[ConstraintSpec] = []  # objective minimums (multi-objective samplers' constraints)
    bootstrap: int = Field(default=1000, ge=100)  # paired-bootstrap resamples of every interval

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        names = [o.name for o in self.objectives or []]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique but got {names}")
        for c in self.constraints:
            if c.objective not in names:
                raise ValueError(f"constraint on objective {c.objective!r}, which is not one of the objectives {names}")
        return self


class LearnerSpec(_Model):
    """Learned weights (search/learn.py): Adam on the per-cell parameters of a linear,
    task_arithmetic, ties or slerp merge, minimising a loss on the search split; after the search
    the result is scored as one more trial, labelled `learned`."""

    steps: int = Field(default=30, ge=1)
    lr: float = Field(default=0.1, gt=0)
    loss: Literal["ce", "entropy"] = "ce"  # ce: minus the smooth objective; entropy: AdaMerging's (README)
    start: Literal["uniform", "best"] = "uniform"  # best: the candidate the search selected
    l2: float = Field(default=0.0, ge=0)  # pull of the values towards `l2_to`
    l2_to: Literal["start", "uniform"] = "start"
    # early stopping: this share of the search split's examples is held out of the loss, the
    # parameters of the step with the lowest held-out loss are kept; null: every example fits and
    # the last step's parameters are kept (the demo: 0.25 and lr 0.1, README)
    early_stop: float | None = Field(default=0.25, gt=0, lt=1)
    patience: int = Field(default=5, ge=1)  # steps without a new lowest held-out loss before it stops
    batch_size: int | None = Field(default=None, ge=1)  # rows per backward pass; null: eval.batch_size
    checkpoint: bool = False  # activation checkpointing per decoder layer (large models; README)
    # ties: the kernel width of its sign flips, a share of the weighted sums' RMS; 0: masks held (README)
    sign_bandwidth: float = Field(default=0.05, ge=0)


class StudySpec(_Model):
    storage: str | None = None  # Optuna storage URL; default sqlite:///<out>/study.db
    study_name: str | None = None  # default: the run name
    sampler: Literal["auto", "gp", "tpe", "cmaes", "qmc", "random", "nsga2"] = "auto"  # auto: by space size (samplers.py)
    # wilcoxon: stop a candidate once its examples so far are significantly worse than the best's;
    # null: wilcoxon when the search split has at least 50 examples (single objective only)
    pruner: Literal["wilcoxon", "none"] | None = None
    prune_threshold: float = Field(default=0.1, gt=0, lt=1)  # Wilcoxon p-value below which a trial stops
    shard_size: int = Field(default=16, ge=1)  # examples scored between two pruning decisions
    select: Literal["best_dev", "robust"] = "robust"  # how the exported best is chosen (selection.py)
    # parameter-free merge methods scored as baseline rows next to each source and uniform;
    # null: every one the sources allow (those needing a base only with merge.base_model)
    baseline_methods: list[str] | None = None
    n_trials: int = Field(default=30, ge=1)  # total finished trials wanted; resume runs the rest
    timeout: float | None = Field(default=None, gt=0)  # seconds for this invocation
    seed: int = 0
    # RDB storages: a worker beats every heartbeat_interval s; a RUNNING trial silent for
    # grace_period s is marked failed and its parameters re-queued once (a dead worker's trial)
    heartbeat_interval: int = Field(default=30, ge=1)
    grace_period: int = Field(default=120, ge=2)
    learner: LearnerSpec | None = None  # learn the weights by gradient after the search: one more trial, `learned`


class RunConfig(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    models: list[ModelSpec]
    merge: MergeSpec = MergeSpec()
    eval: EvalSpec = EvalSpec()
    study: StudySpec = StudySpec()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    out: str | None = None  # run folder; default runs/<name>
    # Folder the config was read from: relative model paths resolve against it.
    base_dir: Path | None = Field(default=None, exclude=True)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        if len(models) < 2:
            raise ValueError(f"a merge needs at least 2 models but got {len(models)}")
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique but got {dupes} more than once")
        return models

    @model_validator(mode="after")
    def _learner(self) -> RunConfig:
        if self.study.learner is None:
            return self
        if self.merge.method not in LEARNABLE:
            raise ValueError(f"study.learner learns the parameters of merge.method {', '.join(LEARNABLE)} (the others "
                             f"pick elements at random or by rank bands), not {self.merge.method}")
        if self.eval.objectives and len(self.eval.objectives) > 1:
            raise ValueError("study.learner learns one objective; this study has "
                             f"{len(self.eval.objectives)} (eval.objectives)")
        return self

    @model_validator(mode="after")
    def _baseline_methods(self) -> RunConfig:
        wanted = self.study.baseline_methods
        if wanted is None:
            return self
        ok = baseline_methods(len(self.models), bool(self.merge.base_model))
        for name in wanted:
            if name not in ok:
                raise ValueError(f"study.baseline_methods: {name!r} is not a parameter-free method these "
                                 f"{len(self.models)} models{' and base' if self.merge.base_model else ''} can be "
                                 f"merged with; possible: {', '.join(ok) or 'none'}")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"study.baseline_methods: listed twice in {wanted}")
        return self

    @property
    def baseline_methods(self) -> list[str]:
        """The parameter-free methods the study scores as baseline rows."""
        if self.study.baseline_methods is not None:
            return list(self.study.baseline_methods)
        return baseline_methods(len(self.models), bool(self.merge.base_model), exclude=self.merge.method)

    @model_validator(mode="after")
    def _enough_models(self) -> RunConfig:
        spec = METHODS[self.merge.method]
        if spec.max_models is not None and spec.max_models - spec.base_row < 2:
            raise ValueError(f"{spec.name} takes one model: there is nothing to merge or search "
                             "(use it in a `slices:` config with merge-search merge)")
        if parameter_free(spec):
            raise ValueError(f"{spec.name} has nothing to search: merge with it directly (merge-search merge), "
                             "or list it in study.baseline_methods of a search")
        n = len(self.models) + (1 if spec.base_row else 0)  # the method's count includes its base
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            lo, hi = spec.min_models - spec.base_row, None if spec.max_models is None else spec.max_models - spec.base_row
            want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"{spec.name} merges {want} models but got {len(self.models)}")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    @property
    def study_name(self) -> str:
        return self.study.study_name or self.name

    @property
    def storage_url(self) -> str:
        return self.study.storage or f"sqlite:///{(self.out_dir / 'study.db').resolve()}"


def _field_path(loc: tuple) -> str:
    return field_path(loc) or "(top level)"


# The `merge-search run` options that set config fields: an error in such a field names the option.
CLI_OPTIONS = {"study.n_trials": "--trials", "study.timeout": "--timeout", "study.storage": "--storage",
               "study.study_name": "--study-name", "out": "--out", "device": "--device",
               "study.learner.steps": "--steps", "study.learner.lr": "--lr", "study.learner.start": "--start",
               "study.learner.early_stop": "--early-stop"}


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _describe(err: dict) -> str:
    where = _field_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # our own rules, which quote the value they refuse
        return msg if not err["loc"] else f"{where}: {msg}"
    return f"{where}: {msg} (got {_short(err['input'])})"


def parse_config(data: dict, source: str = "<config>", base_dir: Path | None = None,
                 overridden: dict[str, str] | None = None) -> RunConfig:
    """Validate a config dict; any problem becomes one ConfigError naming `source` and the field.

    overridden: field path -> where its value came from instead (a CLI option), for the message.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level but got {type(data).__name__}")
    if "base_dir" in data:  # set from the file's location, never by the file
        raise ConfigError(f"{source}: base_dir: unknown key")
    try:
        return RunConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as e:
        err = e.errors()[0]
        first = _describe(err)
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        where = (overridden or {}).get(_field_path(err["loc"]), source)
        raise ConfigError(f"{where}: {first}{more}") from None


def load_config(path: str | Path | None = None, **overrides) -> RunConfig:
    """Read and validate a run config YAML (default: the demo config).

    `overrides` are dotted keys set after reading (``study.n_trials=5``, ``device="cpu"``), so
    CLI options go through the same validation as the file; an error in one names its option.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = read_yaml(path, ConfigError)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level but got {type(data).__name__}")
    overridden = {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {p}: expected a mapping but got {_short(node)}")
        node[leaf] = value
        overridden[key] = CLI_OPTIONS.get(key, str(path))
    cfg = parse_config(data, str(path), base_dir=path.resolve().parent, overridden=overridden)
    blocker = next((p for p in (cfg.out_dir, *cfg.out_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # found now, not when the study store is created
        where = overridden.get("out", str(path))
        raise ConfigError(f"{where}: out: {cfg.out_dir} cannot be a run folder: {blocker} is a file")
    return cfg
