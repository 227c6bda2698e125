"""Config: defaults mirror the dataclass, overrides are typed, every mistake is one clear ConfigError."""

import pytest
import yaml

from detector.assets import default_yaml
from detector.config import FIELDS, describe, make_config, parse_cli
from detector.errors import ConfigError


def test_default_yaml_and_dataclass_have_the_same_keys_and_each_key_a_comment():
    defaults = yaml.safe_load(default_yaml().read_text())
    assert list(defaults) == list(FIELDS)
    listed = describe()
    for key in FIELDS:
        assert f"  {key} " in listed


def test_layers_apply_in_order_and_strings_are_converted_by_type():
    config = make_config({"epochs": 5, "imgsz": 320}, parse_cli(["epochs=7", "amp=false", "lr0=0.02"]))
    assert config.epochs == 7 and config.imgsz == 320
    assert config.amp is False and config.lr0 == 0.02
    assert make_config({"optimizer": "adamw"}).optimizer == "AdamW"


@pytest.mark.parametrize(("batch", "fraction"), [("-1", 0.60), ("0.8", 0.8), ("16", None), ("1", None)])
def test_batch_semantics(batch, fraction):
    config = make_config(parse_cli([f"batch={batch}"]))
    assert config.auto_batch_fraction == fraction
    assert type(config.batch) is (float if fraction and fraction != 0.60 else int)  # args.yaml: batch: 16, not 16.0


@pytest.mark.parametrize(("args", "words"), [
    (["epoch=3"], ["unknown", "epoch", "did you mean", "epochs"]),
    (["pretrained=true"], ["unknown", "pretrained", "model=<a .pt"]),  # an Ultralytics key: what to do here
    (["batch=abc"], ["batch='abc'", "a number"]),
    (["batch=0"], ["batch='0'", "-1", "fraction"]),
    (["batch=-2"], ["batch='-2'", "whole number"]),
    (["batch=1.5"], ["batch='1.5'"]),
    (["imgsz=-1"], ["imgsz='-1'", "32"]),
    (["project= "], ["project=' '", "folder path"]),
    (["epochs=2.5"], ["epochs='2.5'", "integer"]),
    (["amp=maybe"], ["amp='maybe'", "true or false"]),
    (["lr0=nan"], ["lr0='nan'"]),
    (["optimizer=rmsprop"], ["optimizer='rmsprop'", "SGD"]),
    (["cache=disk"], ["cache='disk'", "auto, true (ram) or false"]),
    (["epochs"], ["not key=value"]),
    (["multi_scale=1"], ["multi_scale='1'", "[0, 1)", "imgsz x [1 - f, 1 + f]"]),
    (["multi_scale=-0.2"], ["multi_scale='-0.2'", "[0, 1)"]),
    (["mixup=1.5"], ["mixup='1.5'", "[0, 1]"]),
    (["tensorboard=maybe"], ["tensorboard='maybe'", "true or false"]),
    (["close_mosaic=-1"], ["close_mosaic='-1'", "integer >= 0"]),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(args, words):
    with pytest.raises(ConfigError) as info:
        make_config(parse_cli(args))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_an_ultralytics_model_name_points_to_the_scale_built_like_it():
    from detector.model.network import load_scale

    with pytest.raises(ConfigError, match=r"model='yolov8s.yaml'.*\(yolov8s.yaml is an Ultralytics model: model=s is "
                                          r"this package's, built like YOLOv8s\)"):
        load_scale("yolov8s.yaml")
    with pytest.raises(ConfigError, match=r"a \.pt checkpoint$"):  # no hint for a scale this package lacks
        load_scale("yolov8t.yaml")
    assert load_scale("yolo11s.yaml") == load_scale("yolo11s")  # Ultralytics' names of the YOLO11 scales ship


@pytest.mark.parametrize(("value", "wanted"), [("auto", "auto"), ("AUTO", "auto"), ("ram", "true"), (True, "true"),
                                               ("false", "false"), (False, "false")])
def test_cache_is_auto_true_or_false(value, wanted):
    assert make_config({"cache": value}).cache == wanted


def test_python_values_go_through_the_same_checks():
    with pytest.raises(ConfigError, match="batch=0"):
        make_config({"batch": 0})
    with pytest.raises(ConfigError, match="epochs=True"):
        make_config({"epochs": True})


def test_new_training_features_default_off_and_multi_scale_takes_the_peers_boolean_too():
    config = make_config()
    assert (config.multi_scale, config.mixup, config.tensorboard) == (0.0, 0.0, False)
    assert make_config(parse_cli(["multi_scale=0.25"])).multi_scale == 0.25
    assert make_config(parse_cli(["multi_scale=true"])).multi_scale == 0.5  # the peer's older form: +/- 50%
    assert make_config({"multi_scale": False}).multi_scale == 0.0


def test_config_is_frozen():
    config = make_config()
    with pytest.raises(AttributeError):
        config.epochs = 3
