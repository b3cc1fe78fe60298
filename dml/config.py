"""One dataclass tree describes a run. Load it from TOML or JSON, override single keys with
``section.key=value`` strings, validate with errors that name the bad key and the valid ones.

Example TOML::

    [data]
    name = "omniglot"
    image_size = 28

    [loss]
    name = "multi-similarity"
    params = { alpha = 2.0, beta = 50.0 }

    [train]
    epochs = 20
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says what to change."""


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None            # data set folder; default: DML_DATA or built-in candidates
    image_size: int | None = None      # None: the data set's default
    split: str = "default"             # omniglot: "alphabet" or "class"
    val_classes: float = 0.2           # fraction (<1) or number (>=1) of training classes for validation
                                       # (digits / MNIST-likes: of each training class's images)
    split_seed: int = 0
    split_version: int | None = None   # the data set's split version; None: this Tango's (filled
                                       # in at training; digits / MNIST-likes changed in 2, see
                                       # dml/data/splits.py), so runs of different splits differ
    augment: str = "default"           # "default", "none", "translate", "affine", "resized_crop"
    classes_per_batch: int | None = None   # P of the balanced P x K sampler; None: min(8, classes)
    samples_per_class: int | None = None   # K; None: max(4, 32 // P)
    sampler: str = "balanced"              # "balanced" (P x K) or "random" (shuffled batches,
                                           # as the official Metrix code on CUB and Cars)
    batch_size: int | None = None          # "random" sampler only; None: P x K


@dataclass
class ModelConfig:
    name: str = "small-cnn"
    embedding_dim: int = 64
    pretrained: bool = False
    params: dict[str, Any] = field(default_factory=dict)   # e.g. width, depth, pool, head_bn


@dataclass
class LossConfig:
    name: str = "contrastive"
    params: dict[str, Any] = field(default_factory=dict)
    version: int | None = None   # the loss's method version; None: this Tango's (filled in at
                                 # training, so runs of different versions never compare equal)


@dataclass
class MixingConfig:
    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    version: int | None = None   # likewise for the strategy


@dataclass
class TrainConfig:
    epochs: int = 10
    iterations_per_epoch: int | None = None   # None: one pass over the training images
    optimizer: str = "adamw"                  # "adam" or "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    proxy_lr_mult: float = 100.0              # learning-rate multiplier for proxies
    warmup_iterations: int = 0
    schedule: str = "cosine"                  # "cosine", "constant" or "step" (after warm-up)
    lr_step_epochs: int = 10                  # "step": lr *= lr_gamma every this many epochs
    lr_gamma: float = 0.1
    lr_step_stop: int | None = None           # "step": no decay after this epoch (None: never stop)
    adam_eps: float = 1e-8                    # Adam / AdamW epsilon (official Proxy Synthesis 0.01)
    freeze_backbone_epochs: int = 0           # train only the embedding head (and the loss's
                                              # proxies) for this many epochs (official --warm)
    grad_clip: float | None = 10.0            # max global grad norm; None disables
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"                      # "auto", "cpu", "cuda", "cuda:1", ...
    threads: int | None = None                # torch CPU threads; None: torch's default
    workers: int | None = None                # data-loading processes for image files (path-
                                              # backed sets); 0: in the training process;
                                              # None: sized to the cores given (in-memory sets
                                              # never use workers)
    precision: str = "fp32"                   # "fp32", "bf16" or "fp16" (autocast; fp16 with a
                                              # gradient scaler); losses compute in fp32
    eval_every: int = 1                       # epochs between evaluations (the last always runs)
    eval_batch_size: int = 512
    select_metric: str = "recall@1"           # validation metric for the best checkpoint
    recall_at: list[int] | None = None        # the K of Recall@K; None: the data set's list
                                              # (1,2,4,8; SOP 1,10,100,1000; In-Shop 1,10,..,50)
    clustering: bool = True                   # NMI / F1 at each evaluation
    train_embed_max: int | None = 10000       # training images embedded at an evaluation (for
                                              # utilization and the maps): a fixed, seeded,
                                              # class-stratified subsample of at most this many;
                                              # None: all of them
    map_fit_max: int | None = 10000           # UMAP maps: fitted on at most this many points
                                              # (seeded, by split and class), the others placed
                                              # with transform; 0 or None: every point
    save_embeddings: str = "all"              # per-evaluation npz of the embeddings: "all",
                                              # "best+last" (older ones deleted) or "none"
                                              # (old configs: true = "all", false = "none")
    projections: str = "best+last"            # 2-D maps cached for the app at the end: epochs
                                              # "best+last", "all", "last" or "none"
    map_mode: str = "background"              # those maps: "background" (the run is finished
                                              # when training is; a background process makes
                                              # them, see dml.maps) or "inline" (before
                                              # `dml train` returns)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None                   # optional label shown in run tables

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        return _build(cls, d, source)

    def with_overrides(self, overrides: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` strings (value parsed as JSON, else kept as a string)."""
        d = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            path, raw = item.split("=", 1)
            keys = path.strip().split(".")
            value = _parse_value(raw.strip())
            declared = _field_type(keys)
            if value is None and declared == "str":
                value = raw.strip()   # e.g. mixing.name=none is the strategy called "none"
            elif declared in ("str", "str | None") and value is not None \
                    and not isinstance(value, str):
                value = raw.strip()   # a string field keeps what was typed: name=2024
            node = d
            for k in keys[:-1]:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node[keys[-1]] = value
        return RunConfig.from_dict(d, source="overrides")


def _field_type(keys: list[str]) -> str | None:
    """Declared type (as written) of the config field at ``keys``, if it is one."""
    cls: Any = RunConfig
    for i, k in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if k not in fields:
            return None
        t = fields[k].type if isinstance(fields[k].type, str) else str(fields[k].type)
        if i == len(keys) - 1:
            return t
        cls = _dataclass_type(t)
        if cls is None:
            return None
    return None


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table/object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        f = fields[name]
        sub = _dataclass_type(f.type)
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{where}.{name}" if where != "config" else name)
        else:
            kwargs[name] = _check_type(value, f, f"{where}.{name}" if where != "config" else name)
    return cls(**kwargs)


_SECTIONS = {"DataConfig": DataConfig, "ModelConfig": ModelConfig, "LossConfig": LossConfig,
             "MixingConfig": MixingConfig, "TrainConfig": TrainConfig}


def _dataclass_type(t):
    return _SECTIONS.get(t if isinstance(t, str) else getattr(t, "__name__", ""))


# Values of fields that changed type, as older configs (and run config.json files) wrote them.
LEGACY_VALUES = {"save_embeddings": {"true": "all", "false": "none"}}
SAVE_EMBEDDINGS = ("all", "best+last", "none")
MAP_MODES = ("background", "inline")          # train.map_mode (see dml.maps)


def _check_type(value: Any, f: dataclasses.Field, where: str) -> Any:
    t = f.type if isinstance(f.type, str) else str(f.type)
    optional = "None" in t
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    base = t.replace(" | None", "").strip()
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    elif base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif base == "str":
        if f.name in LEGACY_VALUES and isinstance(value, (bool, str)) \
                and str(value).lower() in LEGACY_VALUES[f.name]:
            return LEGACY_VALUES[f.name][str(value).lower()]
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif base == "list[int]":
        if not isinstance(value, (list, tuple)) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v
                for v in value):
            raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
        return [int(v) for v in value]
    elif base.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of parameters, got {value!r}")
        return dict(value)
    return value


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a RunConfig from a .toml or .json file, with a clear error for any problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as fh:
                d = tomllib.load(fh)
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        else:
            raise ConfigError(f"config file {path!r}: use a .toml or .json file")
    except ConfigError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"config file {path!r} is not valid "
                          f"{'TOML' if path.endswith('.toml') else 'JSON'}: {exc}") from exc
    try:
        return RunConfig.from_dict(d, source="config")
    except ConfigError as exc:
        raise ConfigError(f"config file {path!r}: {exc}") from None


def batch_shape(data: DataConfig, num_classes: int) -> tuple[int, int]:
    """(P, K) of the balanced sampler, filling in the automatic defaults."""
    p = data.classes_per_batch or min(8, num_classes)
    k = data.samples_per_class or max(4, 32 // p)
    return p, k


# Allowed ranges of the numeric fields: key -> (low, high, low is exclusive). None: unbounded.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "data.image_size": (4, 1024, False),
    "data.val_classes": (0, None, False),
    "data.split_seed": (0, 2**32 - 1, False),
    "data.classes_per_batch": (2, None, False),
    "data.samples_per_class": (1, None, False),
    "data.batch_size": (2, None, False),
    "model.embedding_dim": (1, 8192, False),
    "train.epochs": (1, None, False),
    "train.iterations_per_epoch": (1, None, False),
    "train.lr": (0, None, True),
    "train.weight_decay": (0, None, False),
    "train.proxy_lr_mult": (0, None, True),
    "train.warmup_iterations": (0, None, False),
    "train.lr_step_epochs": (1, None, False),
    "train.lr_gamma": (0, 1, True),
    "train.lr_step_stop": (0, None, False),
    "train.adam_eps": (0, None, True),
    "train.freeze_backbone_epochs": (0, None, False),
    "train.grad_clip": (0, None, False),      # 0 (or none) disables clipping
    "train.seed": (0, 2**32 - 1, False),
    "train.threads": (1, 1024, False),
    "train.workers": (0, 256, False),
    "train.eval_every": (1, None, False),
    "train.eval_batch_size": (1, None, False),
    "train.train_embed_max": (1, None, False),
    "train.map_fit_max": (0, None, False),
    "data.split_version": (1, 1000, False),
}
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"


def allowed_range(key: str) -> str:
    """The allowed values of a numeric field in words: 'a finite number > 0', 'an integer in
    1..8192'."""
    lo, hi, open_lo = RANGES[key]
    integer = (_field_type(key.split(".")) or "").startswith("int")
    kind = "an integer" if integer else "a finite number"
    if hi is None:
        return f"{kind} {'>' if open_lo else '>='} {lo}"
    if open_lo:
        return f"{kind} in ({lo}, {hi}]"
    return f"{kind} in {lo}..{hi}" if integer else f"{kind} in [{lo}, {hi}]"


def range_problems(cfg: RunConfig) -> list[str]:
    """One line per numeric field outside its range: key, value and the allowed range."""
    import math

    d = cfg.to_dict()
    out = []
    for key, (lo, hi, open_lo) in RANGES.items():
        section, name = key.split(".")
        value = d[section][name]
        if value is None:
            continue
        bad = (isinstance(value, float) and not math.isfinite(value)) \
            or (value <= lo if open_lo else value < lo) or (hi is not None and value > hi)
        if bad:
            out.append(f"{key}={value!r}: must be {allowed_range(key)}")
    return out


def validate(cfg: RunConfig) -> None:
    """Checks that need no data: value ranges and names of the fixed choices. Every problem is
    one line naming the key, the value and what is allowed."""
    import re

    t, d = cfg.train, cfg.data
    problems = range_problems(cfg)
    if t.optimizer not in ("adam", "adamw"):
        problems.append(f"train.optimizer must be 'adam' or 'adamw', got {t.optimizer!r}")
    if t.schedule not in ("cosine", "constant", "step"):
        problems.append(f"train.schedule must be 'cosine', 'constant' or 'step', got "
                        f"{t.schedule!r}")
    if t.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"train.precision must be 'fp32', 'bf16' or 'fp16', got "
                        f"{t.precision!r}")
    if not re.fullmatch(DEVICE_PATTERN, t.device):
        problems.append(f"train.device={t.device!r}: must be auto, cpu, cuda, cuda:N or mps")
    if d.sampler not in ("balanced", "random"):
        problems.append(f"data.sampler must be 'balanced' or 'random', got {d.sampler!r}")
    from dml.data.transforms import KINDS, ALIASES   # torch; validate runs before training

    if d.augment not in KINDS and d.augment not in ALIASES:
        problems.append(f"data.augment must be one of {list(KINDS)} (or {sorted(ALIASES)}), "
                        f"got {d.augment!r}")
    if t.projections not in ("best+last", "all", "last", "best", "none"):
        problems.append(f"train.projections must be best+last, all, last, best or none, got "
                        f"{t.projections!r}")
    if t.map_mode not in MAP_MODES:
        problems.append(f"train.map_mode must be background or inline, got {t.map_mode!r}")
    if t.save_embeddings not in SAVE_EMBEDDINGS:
        problems.append(f"train.save_embeddings must be all, best+last or none, got "
                        f"{t.save_embeddings!r}")
    ks_ok = True
    if t.recall_at is not None:
        ks = list(t.recall_at)
        if not ks or any(k < 1 or k > 100_000 for k in ks) or len(set(ks)) != len(ks):
            ks_ok = False
            problems.append(f"train.recall_at={ks!r}: must be a non-empty list of distinct "
                            f"integers in 1..100000 (or none: the data set's list)")
    if ks_ok:
        valid_select = select_metrics(cfg)
        if t.select_metric not in valid_select:
            problems.append(f"train.select_metric={t.select_metric!r}: must be one of "
                            f"{', '.join(valid_select)}")
    if len(problems) == 1:
        raise ConfigError(f"invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def recall_ks(cfg: RunConfig) -> tuple[int, ...]:
    """The K of Recall@K a run reports: ``train.recall_at``, else its data set's list."""
    from dml.data.registry import recall_at

    return tuple(sorted(recall_at(cfg.data.name, cfg.train.recall_at)))


def select_metrics(cfg: RunConfig) -> tuple[str, ...]:
    """The validation metrics ``train.select_metric`` may name: recall@K of the run's list,
    r_precision, map@r."""
    return tuple(f"recall@{k}" for k in recall_ks(cfg)) + ("r_precision", "map@r")


def check_params(what: str, params: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Hyperparameters against the types of their defaults: a finite number where the default
    is a number, true / false (or a named mode) where it is a bool. ``what`` names the owner in
    the error (``loss 'triplet'``); raises ValueError. Choices among strings are checked by the
    constructors themselves."""
    import math

    for k, v in params.items():
        default = defaults.get(k)
        if isinstance(default, bool):
            ok, want = isinstance(v, (bool, str)), "true or false"
        elif isinstance(default, (int, float)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            want = "a finite number"
        else:
            continue
        if not ok:
            raise ValueError(f"{what}: {k}={v!r} must be {want} (default {default!r})")


def resolve_versions(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the method versions of its loss and strategy, and the split version of its
    data set, filled in (this Tango's).

    A run's config records the versions it was trained with, so that results of a method (or a
    split) before and after a change that alters them are never grouped or reused as the same
    configuration (``dml bench claims``, the app's Compare page). A config that names another
    method version than this Tango implements is refused: that computation is no longer
    available. Earlier split versions that the data set still builds are kept (a resumed run
    keeps its split); others are refused.
    """
    from dml.data import DatasetError
    from dml.data.registry import DATASETS
    from dml.losses import loss_version
    from dml.mixing import mixing_version

    d = cfg.to_dict()
    data = d["data"]
    try:
        spec = DATASETS[data["name"]]
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    if data.get("split_version") is None:
        data["split_version"] = spec.split_version
    elif data["split_version"] not in spec.split_versions:
        raise ConfigError(
            f"data.split_version={data['split_version']}: data set {spec.name!r} has split "
            f"version(s) {', '.join(map(str, spec.split_versions))} in this Tango (current "
            f"{spec.split_version}); drop data.split_version to use the current split")
    for section, current in (("loss", loss_version), ("mixing", mixing_version)):
        part = d[section]
        try:
            now = current(part["name"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if part.get("version") is None:
            part["version"] = now
        elif part["version"] != now:
            raise ConfigError(
                f"{section}.version={part['version']}: {section} {part['name']!r} is at version "
                f"{now} in this Tango (docs/METHODS.md §12 lists what changed); a run trained "
                f"with version {part['version']} cannot be continued or repeated with it. Start "
                f"a new run, or drop {section}.version to use version {now}")
    return RunConfig.from_dict(d)
