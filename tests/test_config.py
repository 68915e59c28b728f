"""AdapterConfig / TrainConfig validation and the YAML + `--set` loader. Every error names its key."""
from __future__ import annotations

import pytest

from lor2c_ds.adapters.config import AdapterConfig, ConfigError
from lor2c_ds.config import TrainConfig, load_config


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # load_config sets LOR2C_DS_HOME when unset; keep it away from the real cache and the environment
    monkeypatch.setenv("LOR2C_DS_HOME", str(tmp_path / "home"))


MINIMAL = "model: /models/tiny\ndata:\n  path: /data/train.csv\n"


@pytest.fixture
def recipe(tmp_path):
    """Write a YAML recipe (MINIMAL + `extra`) and return its path."""
    def write(extra: str = "", base: str = MINIMAL):
        path = tmp_path / "recipe.yaml"
        path.write_text(base + extra)
        return path
    return write


# ----------------------------------------------------------------------------------------------------
# AdapterConfig
# ----------------------------------------------------------------------------------------------------

def test_defaults_are_valid():
    cfg = AdapterConfig()
    cfg.validate(num_blocks=12, hidden=768)
    assert (cfg.method, cfg.r, cfg.scaling) == ("lor2c", 8, 2.0)
    assert cfg.resolved_spans(3) == [(0, 0), (1, 1), (2, 2)]


def test_unknown_method():
    with pytest.raises(ConfigError, match=r"unknown adapter.method 'loraa'.*'lora', 'lor2c', 'share_lor2c'"):
        AdapterConfig(method="loraa").validate()


def test_unknown_adapter_key():
    with pytest.raises(ConfigError, match=r"unknown adapter config key\(s\) \['rank'\]"):
        AdapterConfig.from_dict({"method": "lor2c", "rank": 4})


@pytest.mark.parametrize("r", [0, -3, 2.5, True, "4"])
def test_r_must_be_positive_int(r):
    with pytest.raises(ConfigError, match=rf"adapter\.r must be a positive integer, got {r!r}"):
        AdapterConfig(r=r).validate()


def test_r_larger_than_hidden():
    AdapterConfig(r=32).validate(hidden=32)  # r == hidden is allowed
    with pytest.raises(ConfigError, match=r"adapter\.r=33 is larger than the model's hidden size 32"):
        AdapterConfig(r=33).validate(hidden=32)
    AdapterConfig(r=33).validate()  # without a model the check cannot run


@pytest.mark.parametrize("alpha", [0, -1.0, "16"])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ConfigError, match=rf"adapter\.alpha must be a positive number, got {alpha!r}"):
        AdapterConfig(alpha=alpha).validate()


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_range(dropout):
    with pytest.raises(ConfigError, match=rf"adapter\.dropout must be in \[0, 1\), got {dropout!r}"):
        AdapterConfig(dropout=dropout).validate()


def test_unknown_init_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown adapter\.init 'orthogonal'; choose one of \['kaiming', 'gaussian'\]"):
        AdapterConfig(init="orthogonal").validate()
    assert AdapterConfig.from_dict({"init": "gaussian"}).init == "gaussian"
    assert AdapterConfig().init == "kaiming"


def test_delta_at_and_activation_checkpointing_are_refused_together():
    from lor2c_ds.config import TrainConfig

    cfg = TrainConfig(model="m", output_dir="o", activation_checkpointing=True,
                      adapter=AdapterConfig(delta_at="output.LayerNorm"))
    cfg.data.path = "d.jsonl"
    with pytest.raises(ConfigError, match=r"adapter\.delta_at adds the LoR2C delta inside the block, which "
                                          r"activation checkpointing recomputes without it"):
        cfg.validate()
    cfg.activation_checkpointing = False
    cfg.validate()


def test_span_out_of_range():
    cfg = AdapterConfig(spans=[[0, 1], [2, 3]])
    cfg.validate()  # fine without knowing the depth
    with pytest.raises(ConfigError, match=r"adapter span \[2, 3\] is out of range: the model has 3 blocks \(0\.\.2\)"):
        cfg.validate(num_blocks=3)
    cfg.validate(num_blocks=4)


def test_overlapping_spans():
    with pytest.raises(ConfigError, match=r"adapter span \[1, 2\] overlaps another span"):
        AdapterConfig(spans=[[0, 1], [1, 2]]).validate(num_blocks=3)
    with pytest.raises(ConfigError, match=r"adapter span \[1, 1\] overlaps"):
        AdapterConfig(spans=[[0, 2], [1, 1]]).validate()


@pytest.mark.parametrize("span", [[2, 1], [-1, 0]])
def test_start_after_end_or_negative(span):
    with pytest.raises(ConfigError, match=rf"adapter span \[{span[0]}, {span[1]}\] is invalid: need 0 <= start <= end"):
        AdapterConfig(spans=[span]).validate()


@pytest.mark.parametrize("span", [[1], [0, 1, 2], ["0", 1], 3])
def test_malformed_span_entries(span):
    with pytest.raises(ConfigError, match=r"adapter\.spans entries must be \[start, end\] integer pairs"):
        AdapterConfig(spans=[span]).validate()


def test_share_groups_need_share_method():
    with pytest.raises(ConfigError, match=r"adapter\.share_groups needs method: share_lor2c"):
        AdapterConfig(method="lor2c", share_groups=[[0]]).validate()
    with pytest.raises(ConfigError, match=r"adapter\.spans / adapter\.share_groups apply to lor2c methods, not lora"):
        AdapterConfig(method="lora", share_groups=[[0]]).validate()
    with pytest.raises(ConfigError, match=r"adapter\.spans / adapter\.share_groups .* not lora"):
        AdapterConfig(method="lora", spans=[[0, 0]]).validate()


def test_share_groups_must_name_span_starts_once():
    with pytest.raises(ConfigError, match=r"share_groups names block 1, where no span starts \(span starts: \[0, 2\]\)"):
        AdapterConfig(method="share_lor2c", spans=[[0, 1], [2, 2]], share_groups=[[1]]).validate(num_blocks=3)
    with pytest.raises(ConfigError, match=r"share_groups lists block 0 in more than one group"):
        AdapterConfig(method="share_lor2c", share_groups=[[0, 1], [0]]).validate(num_blocks=3)
    cfg = AdapterConfig(method="share_lor2c", share_groups=[[2, 0]])
    cfg.validate(num_blocks=3)
    assert cfg.resolved_groups(3) == [[0, 2], [1]]


def test_adapter_config_dict_round_trip():
    cfg = AdapterConfig(method="share_lor2c", r=4, alpha=8.0, spans=[[0, 1], [2, 2]], share_groups=[[0, 2]])
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------------------------------
# TrainConfig through load_config (YAML file + overrides)
# ----------------------------------------------------------------------------------------------------

def test_minimal_recipe_loads(recipe):
    cfg = load_config(recipe())
    assert isinstance(cfg, TrainConfig)
    assert cfg.model == "/models/tiny" and cfg.data.path == "/data/train.csv"
    assert cfg.adapter == AdapterConfig()


def test_launch_line_is_ignored(recipe):
    assert load_config(recipe("launch: lor2c-train --config x.yaml\n")).model == "/models/tiny"


def test_unknown_top_level_key(recipe):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]; known keys: \[.*'lr'"):
        load_config(recipe("learning_rate: 0.1\n"))


def test_unknown_data_key(recipe):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['data\.txt_field'\]; known keys under data: "):
        load_config(recipe("  txt_field: sentence\n"))


def test_unknown_adapter_key_in_recipe(recipe):
    with pytest.raises(ConfigError, match=r"unknown adapter config key\(s\) \['rnak'\]"):
        load_config(recipe("adapter:\n  method: lor2c\n  rnak: 4\n"))


def test_unknown_method_in_recipe(recipe):
    with pytest.raises(ConfigError, match=r"unknown adapter.method 'lor3c'"):
        load_config(recipe("adapter:\n  method: lor3c\n"))


def test_r_nonpositive_in_recipe(recipe):
    with pytest.raises(ConfigError, match=r"adapter\.r must be a positive integer, got 0"):
        load_config(recipe("adapter:\n  r: 0\n"))


def test_section_must_be_a_mapping(recipe):
    with pytest.raises(ConfigError, match=r"data\. must be a mapping, got str"):
        load_config(recipe(base="model: /m\ndata: /data/train.csv\n"))


@pytest.mark.parametrize("extra,message", [
    ("precision: fp16\n", r"unknown precision 'fp16'; choose one of \['fp32', 'bf16'\]"),
    ("task: seq2seq\n", r"unknown task 'seq2seq'"),
    ("  format: xlsx\n", r"unknown data\.format 'xlsx'"),
    ("  eval_fraction: 1.5\n", r"data\.eval_fraction must be in \(0, 1\), got 1\.5"),
    ("micro_batch_size: 0\n", r"micro_batch_size must be a positive integer, got 0"),
    ("nproc: two\n", r"nproc must be a positive integer, got 'two'"),
    ("epochs: true\n", r"epochs must be a positive integer, got True"),
    ("max_steps: -5\n", r"max_steps must be a positive integer or null, got -5"),
    ("lr: -0.1\n", r"lr must be a positive number, got -0\.1"),
])
def test_train_config_values(recipe, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(recipe(extra))


def test_model_and_data_are_required(recipe):
    with pytest.raises(ConfigError, match=r"^model: a local model directory is required"):
        load_config(recipe(base="data:\n  path: /d.csv\n"))
    with pytest.raises(ConfigError, match=r"^data\.path: a local data file is required"):
        load_config(recipe(base="model: /m\n"))


def test_check_world():
    cfg = TrainConfig(model="/m", global_batch_size=32, micro_batch_size=8)
    assert cfg.check_world(1) == 4 and cfg.check_world(2) == 2 and cfg.check_world(4) == 1
    with pytest.raises(ConfigError, match=r"global_batch_size=32 is not a multiple of micro_batch_size x ranks = 8 x 3"):
        cfg.check_world(3)


def test_paths_expand_variables(recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("TINY_ROOT", "/somewhere")
    cfg = load_config(recipe(base="model: ${TINY_ROOT}/model\ndata:\n  path: ${LOR2C_DS_HOME}/d.csv\n"))
    assert cfg.model == "/somewhere/model"
    assert cfg.data.path == f"{tmp_path / 'home'}/d.csv"


# --set overrides --------------------------------------------------------------------------------------

def test_set_overrides_parse_yaml_values(recipe):
    cfg = load_config(recipe("adapter:\n  r: 8\n"), [
        "adapter.r=4", "data.path=/other/data.jsonl", "overwrite_output_dir=true", "adapter.alpha=8",
        "adapter.spans=[[0, 1], [2, 2]]", "data.max_eval_examples=null", "lr=0.002", "adapter.method=share_lor2c",
        "data.eval_path = /held/out.csv",
    ])
    assert cfg.adapter.r == 4 and type(cfg.adapter.r) is int
    assert cfg.data.path == "/other/data.jsonl"
    assert cfg.overwrite_output_dir is True
    assert cfg.adapter.alpha == 8 and cfg.adapter.scaling == 2.0
    assert cfg.adapter.spans == [[0, 1], [2, 2]]
    assert cfg.data.max_eval_examples is None
    assert cfg.lr == 0.002 and isinstance(cfg.lr, float)
    assert cfg.adapter.method == "share_lor2c"
    assert cfg.data.eval_path == "/held/out.csv"


def test_set_creates_sections_and_works_without_a_file():
    cfg = load_config(None, ["model=/m", "data.path=/d.csv", "adapter.method=lora", "adapter.targets=[q, v, down]"])
    assert cfg.adapter.targets == ["q", "v", "down"] and cfg.data.path == "/d.csv"


def test_set_override_is_validated(recipe):
    with pytest.raises(ConfigError, match=r"adapter\.r must be a positive integer, got -2"):
        load_config(recipe(), ["adapter.r=-2"])
    with pytest.raises(ConfigError, match=r"unknown adapter config key\(s\) \['rank'\]"):
        load_config(recipe(), ["adapter.rank=4"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['data\.colunm'\]"):
        load_config(recipe(), ["data.colunm=text"])


def test_set_syntax_errors(recipe):
    with pytest.raises(ConfigError, match=r"--set expects key=value, got 'adapter\.r'"):
        load_config(recipe(), ["adapter.r"])
    with pytest.raises(ConfigError, match=r"--set adapter\.r\.x: r is not a section"):
        load_config(recipe("adapter:\n  r: 8\n"), ["adapter.r.x=1"])


# files --------------------------------------------------------------------------------------------------

def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file {missing} does not exist"):
        load_config(missing)


def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)


def test_malformed_yaml(recipe):
    path = recipe(base="model: /m\ndata: {path: /d.csv\nadapter: [\n")
    with pytest.raises(ConfigError, match=rf"config file {path} is not valid YAML"):
        load_config(path)


def test_yaml_that_is_not_a_mapping(recipe):
    path = recipe(base="- model\n- data\n")
    with pytest.raises(ConfigError, match=rf"config file {path} must hold a mapping of keys, not list"):
        load_config(path)


def test_empty_yaml_reports_the_first_missing_key(recipe):
    with pytest.raises(ConfigError, match=r"^model: a local model directory is required"):
        load_config(recipe(base=""))
