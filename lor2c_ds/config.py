"""The training recipe's configuration: a YAML file, overridable with dotted `key=value` pairs."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .adapters.config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, AdapterConfig, Bound, ConfigError, check_fields

# classification: a label per text (pair); regression: a float target (num_labels 1, MSE);
# chat: prompt/response pairs or message lists, loss on the responses; causal_lm: plain text.
TASKS = ("classification", "regression", "chat", "causal_lm")
PRECISIONS = ("fp32", "bf16")
DATA_FORMATS = ("auto", "polarity_csv", "csv", "tsv", "json", "jsonl", "parquet", "arrow", "saved")
BAD_ROWS = ("error", "skip")


def model_kind(task: str) -> str:
    """The transformers head a task trains: a sequence-classification head or the LM head."""
    return "classification" if task in ("classification", "regression") else "causal_lm"


@dataclass
class DataConfig:
    path: str = ""  # a file, or a directory written by `datasets` save_to_disk (format: saved)
    format: str = "auto"  # by suffix; polarity_csv: headerless "label","text" rows (Pang & Lee)
    eval_path: str | None = None  # the validation split; otherwise `eval_fraction` of `path`, seeded
    test_path: str | None = None  # a test split, evaluated at the end and by lor2c-eval
    eval_fraction: float = 0.1
    streaming: bool = False  # read `path` as a stream: every rank reads the files, keeps every world-th row (needs max_steps)
    shuffle_buffer: int = 10000  # streaming only: the shuffle buffer, seeded by seed and epoch
    # columns
    text_field: str = "text"
    text_pair_field: str | None = None  # a second text (sentence pairs: NLI, STS-B)
    label_field: str = "label"
    prompt_field: str = "prompt"  # chat: a prompt/response pair per row ...
    response_field: str = "response"
    messages_field: str = "messages"  # ... or a list of {"role", "content"} messages
    # tasks
    labels: list | None = None  # classification: the label values in id order; default sorted train values
    chat_template: str | None = None  # chat: a Jinja template file; default: the tokenizer's own
    loss_on: str = "response"  # chat: response tokens only, or "all" tokens
    packing: bool = False  # causal_lm: pack texts into full max_length rows (attention stays per document)
    max_length: int = 128
    on_bad_rows: str = "error"  # empty text, missing label, chat with no response: fail, or skip and count
    max_train_examples: int | None = None
    max_eval_examples: int | None = None


@dataclass
class EvalConfig:
    """Evaluation beyond the held-out loss: which checkpoint to keep, extra scored tasks."""

    best_metric: str | None = None  # e.g. accuracy, f1, mcc, pearson, spearman, perplexity, loss
    best_mode: str = "auto"  # max | min | auto (min for loss and perplexity, max otherwise)
    multiple_choice_path: str | None = None  # jsonl rows {"context" or "messages", "choices": [...], "label": i}
    generation_path: str | None = None  # jsonl rows {"prompt", "answer"}; greedy decoding, exact match
    max_new_tokens: int = 64
    max_examples: int | None = None  # cap for the multiple-choice and generation sets


@dataclass
class TrainConfig:
    model: str = ""  # a local directory (config, weights, tokenizer)
    task: str = "classification"
    num_labels: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    deepspeed: str = "zero3"  # a name in ds_configs/ (zero2, zero3, zero3_offload) or a JSON path
    precision: str = "fp32"
    nproc: int = 1  # local processes started by lor2c-train when no launcher set up the ranks
    output_dir: str = "runs/default"
    overwrite_output_dir: bool = False
    seed: int = 42
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    global_batch_size: int = 32
    micro_batch_size: int = 16
    grad_clip: float = 1.0
    activation_checkpointing: bool = False  # recompute block activations in backward (lor2c-plan says when)
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps; None: evaluate at the end only
    eval_before: bool = True  # evaluate the untuned model first, for comparison
    save_every: int | None = None  # optimizer steps between checkpoints (one is always written at the end)
    keep_checkpoints: int | None = None  # keep the newest K complete checkpoints; None keeps all
    resume: bool = True  # continue from the newest complete checkpoint in output_dir/checkpoints
    export_on_save: bool = False  # rank 0 exports every saved checkpoint to output_dir/export (merged)
    export_dtype: str | None = None  # fp32 | bf16 | fp16 for that export; None keeps the base's dtype

    def validate(self) -> None:
        check_fields(self, "", TRAIN_BOUNDS)  # every field's type and range, from the annotations
        check_fields(self.data, "data.", DATA_BOUNDS)
        check_fields(self.eval, "eval.", EVAL_BOUNDS)
        if not self.model:
            raise ConfigError("model: a local model directory is required")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {list(TASKS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)} "
                              "(fp16 is not offered: bf16 trains without loss scaling)")
        if not self.output_dir:
            raise ConfigError("output_dir: a directory for the run's files is required")
        if not self.data.path:
            raise ConfigError("data.path: a local data file is required")
        if self.data.format not in DATA_FORMATS:
            raise ConfigError(f"unknown data.format {self.data.format!r}; choose one of {list(DATA_FORMATS)}")
        if self.data.on_bad_rows not in BAD_ROWS:
            raise ConfigError(f"data.on_bad_rows must be one of {list(BAD_ROWS)}, got {self.data.on_bad_rows!r}")
        if self.data.loss_on not in ("response", "all"):
            raise ConfigError(f"data.loss_on must be response or all, got {self.data.loss_on!r}")
        if self.data.packing and self.task != "causal_lm":
            raise ConfigError(f"data.packing applies to task causal_lm, not {self.task}")
        if self.data.streaming and not self.max_steps:
            raise ConfigError("data.streaming needs max_steps: a stream's length is not known in advance")
        if self.data.streaming and self.data.packing:
            raise ConfigError("data.packing is not applied to streams; pack the corpus offline or turn streaming off")
        if self.data.streaming and self.data.on_bad_rows != "skip":
            raise ConfigError("data.streaming reads rows lazily, so bad rows can only be skipped and counted: "
                              "set data.on_bad_rows: skip")
        if self.activation_checkpointing and self.adapter.delta_at is not None:
            raise ConfigError("adapter.delta_at adds the LoR2C delta inside the block, which activation "
                              "checkpointing recomputes without it; use one or the other")
        if self.task == "regression" and self.num_labels != 1:
            raise ConfigError(f"task regression predicts one value: num_labels must be 1, got {self.num_labels}")
        if self.data.labels is not None and self.task == "classification" and len(self.data.labels) != self.num_labels:
            raise ConfigError(f"data.labels lists {len(self.data.labels)} labels but num_labels is {self.num_labels}")
        if self.eval.best_mode not in ("auto", "max", "min"):
            raise ConfigError(f"eval.best_mode must be auto, max or min, got {self.eval.best_mode!r}")
        if self.export_dtype not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"export_dtype must be fp32, bf16 or fp16 (or null), got {self.export_dtype!r}")
        self.adapter.validate()

    def check_world(self, world_size: int) -> int:
        """Gradient-accumulation steps for `world_size` ranks; the global batch is fixed."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not a multiple of "
                              f"micro_batch_size x ranks = {self.micro_batch_size} x {world_size}")
        return self.global_batch_size // per_step

    def schedule_steps(self, train_rows: int | None) -> tuple[int, int]:
        """(optimizer steps per epoch, total steps) for `train_rows` rows; None: a stream (one endless epoch)."""
        per_epoch = self.max_steps if train_rows is None else math.ceil(train_rows / self.global_batch_size)
        return per_epoch, self.max_steps or per_epoch * self.epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The numeric fields' ranges; check_fields applies them with each field's annotated type.
TRAIN_BOUNDS = {"num_labels": POSITIVE_INT, "nproc": POSITIVE_INT, "seed": Bound(0, 2**32 - 1), "lr": POSITIVE,
                "weight_decay": NON_NEGATIVE, "warmup_ratio": Bound(0, 1), "epochs": POSITIVE_INT,
                "max_steps": POSITIVE_INT, "global_batch_size": POSITIVE_INT, "micro_batch_size": POSITIVE_INT,
                "grad_clip": NON_NEGATIVE, "log_every": POSITIVE_INT, "eval_every": POSITIVE_INT,
                "save_every": POSITIVE_INT, "keep_checkpoints": POSITIVE_INT}
DATA_BOUNDS = {"eval_fraction": Bound(0, 1, low_open=True, high_open=True), "shuffle_buffer": POSITIVE_INT,
               "max_length": Bound(2), "max_train_examples": POSITIVE_INT, "max_eval_examples": POSITIVE_INT}
EVAL_BOUNDS = {"max_new_tokens": POSITIVE_INT, "max_examples": POSITIVE_INT}


def _build(cls, raw: dict[str, Any], where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(raw).__name__}")
    if cls is AdapterConfig:
        try:
            return AdapterConfig.from_dict(raw)
        except TypeError as e:
            raise ConfigError(f"adapter: {e}") from None
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; "
                          f"known keys{' under ' + where[:-1] if where else ''}: {sorted(known)}")
    values = {}
    for name, value in raw.items():
        sub = {"data": DataConfig, "eval": EvalConfig, "adapter": AdapterConfig}.get(name) if cls is TrainConfig else None
        values[name] = _build(sub, value, f"{name}.") if sub else _coerce(known[name], value, where)
    return cls(**values)


def _coerce(spec: dataclasses.Field, value: Any, where: str) -> Any:
    """YAML reads `1e-3` as a string (its floats need a dot); accept it where a float is expected."""
    if spec.type in ("float", float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}{spec.name} must be a number, got {value!r}") from None
    return value


def _set_dotted(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def _expand_paths(cfg: TrainConfig) -> None:
    from .assets import default_home

    os.environ.setdefault("LOR2C_DS_HOME", str(default_home()))  # recipes name the asset cache by it
    expand = lambda p: os.path.expandvars(os.path.expanduser(p)) if isinstance(p, str) and p else p  # noqa: E731
    cfg.model = expand(cfg.model)
    cfg.output_dir = expand(cfg.output_dir)
    cfg.data.path = expand(cfg.data.path)
    cfg.data.eval_path = expand(cfg.data.eval_path)
    cfg.data.test_path = expand(cfg.data.test_path)
    cfg.data.chat_template = expand(cfg.data.chat_template)
    cfg.eval.multiple_choice_path = expand(cfg.eval.multiple_choice_path)
    cfg.eval.generation_path = expand(cfg.eval.generation_path)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML recipe, apply `key=value` overrides, validate. `${VAR}` and `~` expand in paths."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
        raw.pop("launch", None)  # the command line documented in the recipe itself
    for assignment in overrides:
        _set_dotted(raw, assignment)
    try:
        cfg = _build(TrainConfig, raw, "")
    except TypeError as e:
        raise ConfigError(str(e)) from None
    _expand_paths(cfg)
    cfg.validate()
    return cfg
