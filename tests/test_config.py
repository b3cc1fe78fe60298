import json

import pytest

from dml.config import ConfigError, RunConfig, load_config, validate


def test_roundtrip_dict():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_load_toml_and_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('name = "x"\n[data]\nname = "omniglot"\nimage_size = 28\n'
                    '[loss]\nname = "multi-similarity"\nparams = { beta = 40.0 }\n'
                    '[train]\nepochs = 3\nlr = 1\n')
    cfg = load_config(toml)
    assert cfg.data.name == "omniglot" and cfg.loss.params == {"beta": 40.0}
    assert cfg.train.epochs == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    js = tmp_path / "c.json"
    js.write_text(json.dumps(cfg.to_dict()))
    assert load_config(js) == cfg


@pytest.mark.parametrize("text,match", [
    ('[train]\nepoch = 3\n', r"unknown key\(s\) \['epoch'\]; valid keys: .*'epochs'"),
    ('[trian]\n', r"unknown key\(s\) \['trian'\]"),
    ('[train]\nepochs = "many"\n', "train.epochs: expected an integer"),
    ('[train]\nepochs = \n', "is not valid TOML"),
    ('[data]\nname = 3\n', "data.name: expected a string"),
    ('data = 3\n', "data: expected a table"),
])
def test_bad_config_files_say_what_is_wrong(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "c.yaml").write_text("a: 1")
    with pytest.raises(ConfigError, match="use a .toml or .json"):
        load_config(tmp_path / "c.yaml")


def test_overrides():
    cfg = RunConfig().with_overrides(["train.epochs=7", "loss.params.beta=40",
                                      "data.root=/tmp/x", "train.grad_clip=none",
                                      "model.params.head_bn=true"])
    assert cfg.train.epochs == 7 and cfg.loss.params["beta"] == 40
    assert cfg.data.root == "/tmp/x" and cfg.train.grad_clip is None
    assert cfg.model.params == {"head_bn": True}
    with pytest.raises(ConfigError, match="section.key=value"):
        RunConfig().with_overrides(["epochs"])
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig().with_overrides(["train.epoch=2"])


def test_validate_ranges():
    cfg = RunConfig().with_overrides(["train.epochs=0", "train.optimizer=sgd"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "train.epochs=0: must be an integer >= 1" in str(err.value)
    assert "train.optimizer" in str(err.value)
