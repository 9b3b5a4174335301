"""AdapterConfig as a command-line dataclass (HfArgumentParser, JSON patterns, regex targets), its one set of rules,
its saved form, and the old import paths of the names that moved to loralib.config / loralib.files."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
from transformers import HfArgumentParser

import loralib
from loralib import config as config_module
from loralib import files

# The keys of AdapterConfig.to_dict() in saved adapter folders (adapter_config.json "config") and in config.json of
# save_pretrained: they must stay readable, so the saved form must not change.
SAVED_KEYS = {
    "method", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora",
    "init_lora_weights", "detach_norm", "autocast_adapter_dtype", "rank_pattern", "alpha_pattern",
}


def parse(*argv: str) -> loralib.AdapterConfig:
    (config,) = HfArgumentParser(loralib.AdapterConfig).parse_args_into_dataclasses(args=list(argv))
    return config


def test_every_field_has_help_and_a_command_line_option():
    parser = HfArgumentParser(loralib.AdapterConfig)
    options = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(loralib.AdapterConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name
        assert f"--{f.name}" in options, f.name


def test_parsed_configs_equal_the_ones_built_by_hand():
    assert parse() == loralib.AdapterConfig()  # the library's defaults on the command line too
    assert (parse().r, parse().lora_alpha) == (8, 16.0)
    got = parse("--method", "lora", "--r", "4", "--lora_alpha", "8", "--lora_dropout", "0.05",
                "--target_modules", "query", "key", "--modules_to_save", "classifier", "--use_rslora",
                "--init_lora_weights", "gaussian", "--rank_pattern", '{"key": 2, "query": 6}',
                "--alpha_pattern", '{"key": 1.5}', "--detach_norm", "--autocast_adapter_dtype", "false")
    assert got == loralib.AdapterConfig(
        method="lora", r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["query", "key"],
        modules_to_save=["classifier"], use_rslora=True, init_lora_weights="gaussian",
        rank_pattern={"key": 2, "query": 6}, alpha_pattern={"key": 1.5}, detach_norm=True,
        autocast_adapter_dtype=False,
    )
    assert list(got.rank_pattern) == ["key", "query"]  # JSON keeps the order: the first matching key wins
    assert parse("--lora_r", "5") == loralib.AdapterConfig(r=5)  # the torchrun-safe spelling of --r
    assert parse("--no_autocast_adapter_dtype") == loralib.AdapterConfig(autocast_adapter_dtype=False)


def test_regex_targets_have_their_own_option():
    regex = r".*layer\.[01]\..*(query|value)"
    assert parse("--target_modules_regex", regex) == loralib.AdapterConfig(target_modules=regex)
    assert parse("--target_modules", regex).target_modules == [regex]  # a suffix list: the old trap, now explicit
    cfg = loralib.AdapterConfig(target_modules_regex=regex)
    assert cfg.target_modules == regex and cfg.target_modules_regex is None
    assert loralib.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(cfg, r=2).target_modules == regex
    assert parse("--target_modules", "ALL-LINEAR").target_modules == "all-linear"
    with pytest.raises(ValueError, match="not both"):
        loralib.AdapterConfig(target_modules=["query"], target_modules_regex=regex)
    with pytest.raises(ValueError, match="target_modules_regex .*not a valid regex"):
        loralib.AdapterConfig(target_modules_regex="(")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank_pattern": "{query: 2}"}, r"rank_pattern is not valid JSON"),
        ({"rank_pattern": "[1, 2]"}, "rank_pattern must be a dict"),
        ({"rank_pattern": '{"query": 2.5}'}, r"rank_pattern\['query'\] must be a positive integer"),
        ({"alpha_pattern": '{"query": -1}'}, r"alpha_pattern\['query'\] must be a positive number"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a positive finite number"),
        ({"lora_alpha": True}, "lora_alpha"),
        ({"lora_dropout": True}, "lora_dropout"),
        ({"use_rslora": "false"}, "use_rslora must be true or false"),
        ({"modules_to_save": ["classifier", ""]}, "modules_to_save"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loralib.AdapterConfig(**kwargs)


def test_the_layer_rules_are_the_configs():
    validate = config_module.validate_adapter_options
    validate(r=2, lora_alpha=4, lora_dropout=0.5, init_lora_weights="gaussian")
    for kwargs, message in [
        ({"r": 0, "lora_alpha": 1}, "r must be a positive integer, got 0"),
        ({"r": 2.0, "lora_alpha": 1}, "r must be a positive integer"),
        ({"r": 2, "lora_alpha": float("nan")}, "lora_alpha must be a positive finite number"),
        ({"r": 2, "lora_alpha": 1, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"r": 2, "lora_alpha": 1, "init_lora_weights": "pissa"}, "init_lora_weights must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate(**kwargs)
        with pytest.raises(ValueError, match=message):
            loralib.AdapterConfig(**kwargs)


def test_saved_form_is_unchanged_and_old_folders_load():
    cfg = loralib.AdapterConfig(target_modules=".*query", rank_pattern='{"query": 4}')
    data = cfg.to_dict()
    assert set(data) == SAVED_KEYS and data["target_modules"] == ".*query" and data["rank_pattern"] == {"query": 4}
    assert json.loads(json.dumps(data)) == data
    written_before = {  # AdapterConfig.to_dict() as the loralib before loralib/config.py wrote it
        "method": "dora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"], "use_rslora": False, "init_lora_weights": "kaiming",
        "detach_norm": False, "autocast_adapter_dtype": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    old = loralib.AdapterConfig.from_dict(written_before)
    assert old.to_dict() == written_before
    with pytest.raises(ValueError, match="unknown AdapterConfig keys"):
        loralib.AdapterConfig.from_dict({**written_before, "use_dora": True})


def test_old_import_paths_warn_and_give_the_same_objects():
    from loralib.model import AdapterConfig  # the model module still re-exports the config, without a warning

    assert AdapterConfig is loralib.AdapterConfig is config_module.AdapterConfig
    moved = [
        ("loralib.io", "atomic_write", files.atomic_write),
        ("loralib.io", "atomic_write_text", files.atomic_write_text),
        ("loralib.io", "read_json", files.read_json),
        ("loralib.io", "read_safetensors", files.read_safetensors),
        ("loralib.io", "export_peft", loralib.export_peft),
        ("loralib.model", "pattern_key", config_module.pattern_key),
        ("loralib.model", "METHODS", config_module.METHODS),
        ("utils.files", "atomic_write", files.atomic_write),
        ("utils.files", "atomic_write_text", files.atomic_write_text),
    ]
    import importlib

    for module_name, name, target in moved:
        module = importlib.import_module(module_name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(module, name) is target, (module_name, name)
        assert [w.category for w in caught] == [DeprecationWarning], (module_name, name)
        assert "moved to" in str(caught[0].message)
    with pytest.raises(AttributeError):
        loralib.io.no_such_name  # noqa: B018


def test_files_utilities(tmp_path):
    target = tmp_path / "deep" / "out.txt"
    assert files.atomic_write_text(target, "a\r\nb\n") == target
    assert target.read_bytes() == b"a\r\nb\n"  # newlines untouched
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]  # no temporary file left

    def fail(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, fail)
    assert target.read_bytes() == b"a\r\nb\n" and len(list(target.parent.iterdir())) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        files.read_json(bad)


def test_write_split_writes_the_record_last(tmp_path, monkeypatch):
    record = files.write_split(tmp_path / "d", {"train.csv": "x,y\n1,2\n", "test.csv": "x,y\n"}, {"seed": 3})
    assert record == tmp_path / "d" / "split.json" and json.loads(record.read_text()) == {"seed": 3}
    assert (tmp_path / "d" / "train.csv").read_text() == "x,y\n1,2\n"
    written = []
    real = files.atomic_write_text

    def crash_on_test(path, text):  # a crash while the second data file is written: no record may exist
        written.append(Path(path).name)
        if Path(path).name == "test.csv":
            raise OSError("disk full")
        return real(path, text)

    monkeypatch.setattr(files, "atomic_write_text", crash_on_test)
    with pytest.raises(OSError):
        files.write_split(tmp_path / "e", {"train.csv": "a\n", "test.csv": "b\n"}, {"seed": 0})
    assert written == ["train.csv", "test.csv"] and not (tmp_path / "e" / "split.json").exists()
