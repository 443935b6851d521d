"""Config system and parameter estimator."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import Config, ModelConfig, load_config, save_config
from pretrain.configlib import ConfigError
from pretrain.plan.estimate import count_parameters

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["0.16b", "0.37b", "0.76b", "1.4b", "7b"]


def test_yaml_then_overrides(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml", ["optim.lr=1e-4", "model.patch_encoder=unet", "train.steps=7"])
    assert cfg.optim.lr == 1e-4 and cfg.model.patch_encoder == "unet" and cfg.train.steps == 7
    assert cfg.model.n_layers == 2  # from the file
    assert cfg.optim.betas == (0.9, 0.95)  # from the defaults
    out = tmp_path / "merged.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_unknown_key_names_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean lr"):
        load_config(None, ["optim.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'model.n_layer'.*n_layers"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*model"):
        load_config(None, ["modle.dim=3"])


def test_wrong_type_names_field_and_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.n_layers: expected int, got 'two'"):
        load_config(None, ["model.n_layers=two"])
    with pytest.raises(ConfigError, match=r"model.attention: expected one of 'flex' \| 'sdpa'"):
        load_config(None, ["model.attention=xformers"])
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: expected bool"):
        load_config(None, ["train.activation_checkpointing=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  streams:\n    - {name: text, proportion: lots}\n")
    with pytest.raises(ConfigError, match=r"data.streams\[0\].proportion"):
        load_config(bad)


def test_post_init_says_what_to_change() -> None:
    with pytest.raises(ConfigError, match="model.dim=100 must be divisible by model.n_heads=3"):
        load_config(None, ["model.dim=100", "model.n_heads=3"])
    with pytest.raises(ConfigError, match="model.patch_size must be 1, 2, 4 or 8"):
        load_config(None, ["model.patch_size=3"])


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_load(name: str) -> None:
    cfg = load_config(ROOT / f"configs/transfusion_{name}.yaml")
    layers, dim, heads = {"0.16b": (16, 768, 12), "0.37b": (24, 1024, 16), "0.76b": (24, 1536, 24),
                          "1.4b": (24, 2048, 16), "7b": (32, 4096, 32)}[name]
    assert (cfg.model.n_layers, cfg.model.dim, cfg.model.n_heads) == (layers, dim, heads)
    assert cfg.train.global_batch_size * cfg.data.seq_len in (2**21, 2**22)  # 2M or 4M positions


def test_7b_matches_llama2_and_unet_adds_027b() -> None:
    cfg = load_config(ROOT / "configs/transfusion_7b.yaml", ["model.patch_encoder=linear"])
    n = count_parameters(cfg.model)["total"]
    assert abs(n - 6.74e9) / 6.74e9 < 0.02, n
    assert cfg.model.hidden_dim == 11008
    for name in PAPER:
        lin = load_config(ROOT / f"configs/transfusion_{name}.yaml", ["model.patch_encoder=linear"])
        unet = load_config(ROOT / f"configs/transfusion_{name}.yaml", ["model.patch_encoder=unet"])
        added = count_parameters(unet.model)["total"] - count_parameters(lin.model)["total"]
        assert abs(added - 0.27e9) / 0.27e9 < 0.15, (name, added)


def test_estimate_cli_prints_exact_count() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pretrain.plan.estimate", "--config", str(ROOT / "configs/tiny.yaml")],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("parameters: "))
    cfg = load_config(ROOT / "configs/tiny.yaml")

    from pretrain.model import Transfusion

    expected = sum(p.numel() for p in Transfusion(cfg.model).parameters())
    assert int(line.split()[1]) == expected


def test_estimate_cli_rejects_bad_key() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pretrain.plan.estimate", "--config", str(ROOT / "configs/tiny.yaml"), "model.widht=3"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert res.returncode == 2 and "model.widht" in res.stderr


def test_defaults_are_valid() -> None:
    assert Config() == load_config(None)


def test_saved_config_loads_back_equal_with_every_section_changed(tmp_path: Path) -> None:
    """save_config -> load_config gives back an equal Config when every section holds non-default values of
    each kind the YAML must carry (tuples, None, lists of strings, nested stream lists, floats in e-notation);
    a dump that lost a tuple, a None or a stream would make them differ. The exported and checkpointed
    config.yaml are written this way, so a resume or an export reads what the run used."""
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "model.unet_channels=[8,16]", "model.patch_encoder=unet", "model.n_kv_heads=2", "model.rope_theta=5e5",
        "optim.betas=[0.8,0.9]", "optim.lr=3e-4", "train.ema_decay=0.99", "train.init_from=some/dir",
        "logging.sample_prompts=[a, 'b: c']", "logging.peak_flops=1.5e14", "distributed.zero_stage=2",
        "checkpoint.every=7", "data.seq_len=512",
    ])
    assert cfg != load_config(ROOT / "configs/tiny.yaml")  # the overrides took effect
    assert cfg.model.unet_channels == (8, 16) and cfg.optim.betas == (0.8, 0.9)
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")
    assert back == cfg
    assert isinstance(back.model.unet_channels, tuple) and back.logging.sample_prompts == ["a", "b: c"]


def test_layered_config_files(tmp_path: Path) -> None:
    """Later files override earlier ones key by key (how a data.yaml fragment joins configs/tiny.yaml)."""
    frag = tmp_path / "data.yaml"
    frag.write_text("data:\n  seq_len: 128\nmodel:\n  latent_size: 4\n")
    for spec in ([ROOT / "configs/tiny.yaml", frag], f"{ROOT / 'configs/tiny.yaml'},{frag}"):
        cfg = load_config(spec, ["data.num_workers=0"])
        assert cfg.data.seq_len == 128 and cfg.model.latent_size == 4
        assert cfg.model.n_layers == 2 and cfg.data.num_workers == 0


def test_readme_documents_every_config_key() -> None:
    """Every config field appears as `section.key` in README.md's config reference (keeps the README true)."""
    import dataclasses

    readme = (ROOT / "README.md").read_text()
    missing = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                    else type(getattr(Config(), section.name)))
        if f"`{section.name}.{f.name}`" not in readme
    ]
    assert not missing, f"README.md config reference lacks: {missing}"


def _readme_default(cell: str) -> object:
    """A README default cell as a value: YAML, with 1e-5-style floats (YAML 1.1 reads them as strings)."""
    text = cell.strip().strip("`")
    try:
        return float(text) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", text) else yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def test_readme_config_defaults_equal_the_dataclass_defaults_both_ways() -> None:
    """README's config reference and the dataclasses agree in both directions: every documented key exists
    and its documented default equals the field's declared default (a changed default or a renamed key
    must change the README), and every field has a row. Lists compare as lists; a few cells describe a
    default too long for the table, checked by what they state (the count of prompts)."""
    import dataclasses

    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| ([^|]*) \|", readme, re.M))
    defaults = {}
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            defaults[f"{section.name}.{f.name}"] = list(default) if isinstance(default, tuple) else default
    assert set(rows) - set(defaults) == set(), "README documents keys the config does not have"
    assert set(defaults) - set(rows) == set(), "config keys without a README row"
    described = {"logging.sample_prompts": lambda cell, d: cell.startswith(f"{len(d)} ")}
    wrong = {k: (rows[k].strip(), defaults[k]) for k in rows
             if not (described[k](rows[k].strip(), defaults[k]) if k in described
                     else _readme_default(rows[k]) == defaults[k])}
    assert not wrong, f"README default != dataclass default: {wrong}"


def test_moved_keys_name_their_new_place(tmp_path: Path) -> None:
    """logging.sample_vae is now data.vae; model.max_seq_len is now data.seq_len (one sequence length)."""
    with pytest.raises(ConfigError, match=r"'logging.sample_vae' is now 'data.vae'"):
        load_config(None, ["logging.sample_vae=/vae"])
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  max_seq_len: 256\n")
    with pytest.raises(ConfigError, match=r"old.yaml.*'model.max_seq_len' is now 'data.seq_len'"):
        load_config(old)
    assert load_config(None, ["data.vae=/vae"]).data.vae == "/vae"


def test_image_must_fit_the_sequence_length() -> None:
    with pytest.raises(ConfigError, match=r"260 positions, more than data.seq_len=128"):
        load_config(None, ["data.seq_len=128"])  # 32x32 latent, patch 2: 256 patches + BOS/BOI/EOI/EOS


def test_vocab_size_comes_from_the_tokenizer_in_every_entry_point(demo_data) -> None:
    """One source: the tokenizer's metadata when data.tokenizer is set (also for pretrain.plan.estimate)."""
    cfg = load_config([ROOT / "configs/tiny.yaml", demo_data.config_path])
    assert cfg.model.vocab_size == demo_data.vocab_size != ModelConfig().vocab_size
    assert load_config([ROOT / "configs/tiny.yaml", demo_data.config_path],
                       [f"model.vocab_size={demo_data.vocab_size}"])
    with pytest.raises(ConfigError,
                       match=r"model.vocab_size=5000 disagrees with data.tokenizer.*drop model.vocab_size"):
        load_config([ROOT / "configs/tiny.yaml", demo_data.config_path], ["model.vocab_size=5000"])
    with pytest.raises(ConfigError, match=r"data.tokenizer=/nope.model.*tokenizer metadata missing"):
        load_config(None, ["data.tokenizer=/nope.model"])
    out = subprocess.run(
        [sys.executable, "-m", "pretrain.plan.estimate", "--config",
         f"{ROOT / 'configs/tiny.yaml'},{demo_data.config_path}"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    assert int(next(ln for ln in out.splitlines() if ln.startswith("parameters: ")).split()[1]) == \
        count_parameters(cfg.model)["total"]
