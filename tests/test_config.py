"""Typed params: the shipped file loads, bad keys and values stop with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmplatform.config import (
    RUN_PARAMS,
    ConfigError,
    Params,
    TrainParams,
    apply_overrides,
    load_params,
    parse_override,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load_and_match_defaults():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.model_dump(by_alias=True) == Params().model_dump(by_alias=True), \
        "params.yaml and the typed defaults in mmplatform/config.py have drifted apart"


def _keys(stage: dict) -> list[str]:
    """The params keys a dvc.yaml stage lists; every one must come from the run's params file (params.yaml with
    the -S overrides), never from params.yaml itself, which would miss the overrides."""
    entries = stage.get("params", [])
    assert all(isinstance(e, dict) and list(e) == [RUN_PARAMS] for e in entries), entries
    return [k for e in entries for k in e[RUN_PARAMS]]


# The stage that writes the run's params file reads params.yaml whole, as a dep.
NOT_A_SECTION = {"params"}


def test_every_params_key_named_in_dvc_yaml_exists():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    named = [k for s in stages.values() for k in _keys(s)]
    assert named
    for key in named:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml names {key}, missing in params.yaml"
            node = node[part]


# Stages that also read another stage's keys: the sweep varies the train section; evaluate scores the champion
# that register's keys name.
READS_WHOLE = {"tune": {"train"}, "evaluate": {"register.model_name", "register.alias"}}
# Stages that list their own section whole: rl_finetune's keys depend on its algorithm (scst / ppo / grpo).
OWN_SECTION_WHOLE = {"rl_finetune"}


def test_each_stage_reads_only_its_own_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, s in stages.items():
        own = [k for k in _keys(s) if k not in READS_WHOLE.get(name, set())]
        assert {k.split(".")[0] for k in own} <= {name}, name
        assert f"pipelines/{name}.py" in s["deps"], f"{name} does not list its own code"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"no_such_key": 1}}, "params.yaml: train.no_such_key: unknown key"),
        ({"nosection": {}}, "params.yaml: nosection: unknown key"),
        ({"train": {"vision": {"layerz": 2}}}, "params.yaml: train.vision.layerz: unknown key"),
    ],
)
def test_unknown_keys_rejected_with_one_line(raw, expected):
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert str(info.value) == expected
    assert "\n" not in str(info.value)


def test_bad_values_rejected_naming_key():
    with pytest.raises(ConfigError, match=r"^params.yaml: train.lr: .*number"):
        validate({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"^params.yaml: train.fusion: "):
        validate({"train": {"fusion": "telepathy"}})
    with pytest.raises(ConfigError, match=r"^params.yaml: clean.val_fraction: "):
        validate({"clean": {"val_fraction": 1.5}})


def test_overrides_are_typed_and_validated():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("train.fusion=concat") == (["train", "fusion"], "concat")
    raw = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "train.vision.layers=1"])
    p = validate(raw)
    assert p.train.lr == 0.5 and p.train.vision.layers == 1
    with pytest.raises(ConfigError):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="train.no_such_key: unknown key"):
        load_params(ROOT / "params.yaml", ["train.no_such_key=1"])


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_switching_rl_algorithm_by_override_drops_the_files_scst_only_keys(algo, caplog):
    # The shipped file is written for SCST (baseline: loo); -S rl_finetune.algorithm=grpo must still run.
    assert "baseline" in yaml.safe_load((ROOT / "params.yaml").read_text())["rl_finetune"]
    with caplog.at_level("WARNING", logger="mmplatform.config"):
        p = load_params(ROOT / "params.yaml", [f"rl_finetune.algorithm={algo}", "rl_finetune.steps=7"])
    assert p.rl_finetune.algorithm == algo and p.rl_finetune.steps == 7
    assert "baseline" in caplog.text
    # A key the override itself sets is not dropped: it is still reported as unknown for that algorithm.
    with pytest.raises(ConfigError, match=rf"rl_finetune.baseline: unknown key \(algorithm {algo}\)"):
        load_params(ROOT / "params.yaml", [f"rl_finetune.algorithm={algo}", "rl_finetune.baseline=greedy"])


def test_cli_rejects_unknown_override_with_one_line(capsys):
    from flows.cli import main

    rc = main(["run", "--workdir", str(ROOT), "-S", "train.no_such_key=1"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.count("\n") == 0 and "train.no_such_key" in err, err


def test_missing_params_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_each_stage_lists_every_key_of_its_section():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, s in stages.items():
        if name in NOT_A_SECTION:
            assert "params.yaml" in s["deps"] and not _keys(s)
            continue
        if name in OWN_SECTION_WHOLE:
            assert name in _keys(s), f"{name}: dvc.yaml should list the whole section"
            continue
        listed = {k.split(".", 1)[1] for k in _keys(s) if k.startswith(f"{name}.")}
        assert listed == set(params[name]), f"{name}: dvc.yaml lists {sorted(listed)}"


def test_generative_vqa_rl_without_an_answer_decoder_fails_when_the_file_loads():
    """rl_finetune.task=vqa needs the decoder trained to answer: said when params load, not after training."""
    from mmplatform.config import read_raw

    raw = apply_overrides(read_raw(ROOT / "params.yaml"), ["rl_finetune.task=vqa"])
    with pytest.raises(ConfigError) as exc:
        validate(raw, "params.yaml")
    assert str(exc.value) == ("params.yaml: rl_finetune.task=vqa fine-tunes the answer decoder, which only "
                              "train.loss_weights.vqa_generative > 0 trains; set it (e.g. 0.5)")
    ok = apply_overrides(raw, ["train.loss_weights.vqa_generative=0.5"])
    assert validate(ok, "params.yaml").rl_finetune.task == "vqa"


def test_new_vision_and_mlm_keys_are_checked():
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        TrainParams.model_validate({"vision": {"stem": "conv", "patch_size": 12}})
    with pytest.raises(ValueError, match="divisible by 4"):
        TrainParams.model_validate({"vision": {"position_init": "sincos", "hidden_size": 18}})
    with pytest.raises(ValueError, match="needs fusion: cross_attention"):
        TrainParams.model_validate({"mlm_through_fusion": True, "loss_weights": {"mlm": 0.5}, "fusion": "concat"})
    assert TrainParams.model_validate({"vision": {"stem": "conv", "patch_size": 16}}).vision.stem == "conv"


def test_bench_recipes_are_valid_train_sections():
    """The recipes the training benches read (bench/recipes/*.yaml) stay loadable as the train section evolves."""
    files = sorted((ROOT / "bench" / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        TrainParams.model_validate(yaml.safe_load(f.read_text())["train"])


def test_off_on_yes_no_are_words_not_booleans(tmp_path):
    """YAML 1.1 read `mode: off` as False, so the documented value was refused as "Input should be 'off', ...";
    params files and -S values are read with YAML 1.2's booleans (true/false only)."""
    p = load_params(ROOT / "params.yaml", ["clean.alignment.mode=off", "train.foil_negatives=no"])
    assert p.clean.alignment.mode == "off" and p.train.foil_negatives is False
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean"]["alignment"]["mode"] = "off"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw).replace("mode: 'off'", "mode: off"))
    assert "mode: off" in (tmp_path / "params.yaml").read_text()
    assert load_params(tmp_path / "params.yaml").clean.alignment.mode == "off"
