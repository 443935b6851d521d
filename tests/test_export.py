"""Export of a real 2-rank ZeRO-3 checkpoint to safetensors, and generation from the export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from contract.dist_env import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """4 steps of the tiny config on 2 gloo ranks under torchrun, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("export_run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pretrain.train", "--config", f"configs/tiny.yaml,{demo_data.config_path}",
           f"train.run_dir={run_dir}", "train.steps=4", "checkpoint.every=2", "logging.sample_every=0",
           "logging.val_every=0"]  # data.vae (the demo data's VAE) is shipped by export
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        out, _ = proc.communicate()
        pytest.fail(f"2-rank training did not finish in 900 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return run_dir


def _export(run_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.artifacts.export", "--run-dir", str(run_dir), "--out",
                           str(out),
                           *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_matches_deepspeed_consolidation_and_shards(trained_run: Path, tmp_path: Path) -> None:
    """Every exported tensor equals DeepSpeed's own (eager) zero_to_fp32 consolidation; sharding loses nothing."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    res = _export(trained_run, tmp_path / "one")
    assert res.returncode == 0, res.stderr[-2000:]
    exported = load_file(tmp_path / "one" / "model.safetensors")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(trained_run / "checkpoints"), tag="step_00000004")
    assert exported.keys() == reference.keys()
    for k in reference:
        assert torch.equal(exported[k], reference[k]), k
    from pretrain.model import Transfusion
    from pretrain.config import load_config

    cfg = load_config(tmp_path / "one" / "config.yaml")
    assert set(Transfusion(cfg.model).state_dict()) == set(exported)
    # Tiny shards: several files plus an index, same tensors.
    res = _export(trained_run, tmp_path / "many", "--max-shard-gb", str(200_000 / 2**30))
    assert res.returncode == 0, res.stderr[-2000:]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 1
    merged = {}
    for f in files:
        merged.update(load_file(tmp_path / "many" / f))
    assert merged.keys() == exported.keys() and all(torch.equal(merged[k], exported[k]) for k in merged)
    # An earlier step is selectable and differs.
    res = _export(trained_run, tmp_path / "step2", "--step", "2")
    assert res.returncode == 0
    early = load_file(tmp_path / "step2" / "model.safetensors")
    assert any(not torch.equal(early[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_generate_cli_writes_pngs_and_captions(trained_run: Path, demo_data, tmp_path: Path) -> None:
    assert _export(trained_run, tmp_path / "exp").returncode == 0
    image = next((demo_data.root / "raw").glob("**/*.png"))
    res = subprocess.run(
        [sys.executable, "-m", "pretrain.inference.generate", "--model", str(tmp_path / "exp"), "--out",
         str(tmp_path / "png"),
         "--steps", "4", "--prompt", "a red circle at the top left", "--prompt", "a blue square",
         "--caption", str(image), "--text", "The", "--max-new-tokens", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    assert f"{image} -> " in res.stdout and "'The' -> " in res.stdout
    only_prompt = subprocess.run(  # images alone: no caption or text requests
        [sys.executable, "-m", "pretrain.inference.generate", "--model", str(tmp_path / "exp"), "--out",
         str(tmp_path / "png2"),
         "--steps", "2", "--prompt", "a red circle at the top left"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert only_prompt.returncode == 0, only_prompt.stderr[-2000:]
    from pretrain.inference.generate import sample_names  # files say their prompt: <slug>_<k>.png

    assert (tmp_path / "png2" / f"{sample_names(['a red circle at the top left'], 1)[0]}.png").is_file()
    assert (tmp_path / "png2" / "a-red-circle-at-the-top-left_000.png").is_file()


def test_export_errors_name_what_is_missing(tmp_path: Path) -> None:
    res = _export(tmp_path / "nope", tmp_path / "out")
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr and "nope" in res.stderr


def test_rank_file_checks_name_the_missing_or_truncated_file(tmp_path: Path) -> None:
    """check_rank_files on a checkpoint layout whose checkpoint.json says 2 ranks wrote it."""
    import io
    import zipfile

    from pretrain.train import checkpoint
    from pretrain.artifacts.export import ExportError, check_rank_files

    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    (ckpt / checkpoint.META).write_text(json.dumps({"step": 4, "world_size": 2}))
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(3)}, buf)  # a real torch.save zip archive
    names = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    for n in names:
        (ckpt / n).write_bytes(buf.getvalue())
    check_rank_files(ckpt)
    (ckpt / names[3]).unlink()  # rank 1's optimizer shard
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt is missing .*2 ranks"):
        check_rank_files(ckpt)
    (ckpt / names[3]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert not zipfile.is_zipfile(ckpt / names[3])
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated"):
        check_rank_files(ckpt)


def test_shard_names_follow_the_zero_stage_and_stage0_raw_export_is_refused(tmp_path: Path) -> None:
    """What DeepSpeed writes per ZeRO stage; a stage-0 checkpoint has no unpickled home for its weights."""
    from pretrain.artifacts.export import ExportError, lazy_tensors, shard_names

    assert shard_names(tmp_path, 3, 2) == [f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1)
                                           for k in ("model", "optim")]
    for stage in (1, 2):
        assert shard_names(tmp_path, stage, 2) == ["mp_rank_00_model_states.pt",
                                                   "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                   "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert shard_names(tmp_path, 0, 2) == ["mp_rank_00_model_states.pt"]
    (tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    assert shard_names(tmp_path, 2, 1)[1] == "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(ExportError, match=r"ZeRO stage 0 .*--weights ema"):
        lazy_tensors(tmp_path, 0)


def test_atomic_write_replaces_exports_whole_and_refuses_other_dirs(tmp_path: Path) -> None:
    from pretrain.artifacts.export import ExportError, write_atomically

    out = tmp_path / "out"

    def shards(n: int):
        def fill(tmp: Path) -> None:
            for i in range(n):
                (tmp / f"model-{i:05d}.safetensors").write_text("x")
            (tmp / "export.json").write_text("{}")
        return fill

    write_atomically(out, False, shards(3))
    write_atomically(out, False, shards(1))  # re-export into an export: replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model-00000.safetensors"]

    def boom(tmp: Path) -> None:
        (tmp / "model-00000.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(out, False, boom)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model-00000.safetensors"]  # old one intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind
    with pytest.raises(OSError):
        write_atomically(tmp_path / "new", False, boom)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export .*--force"):
        write_atomically(mine, False, shards(1))
    assert (mine / "notes.txt").read_text() == "keep me"
    write_atomically(mine, True, shards(1))
    assert not (mine / "notes.txt").exists()


def test_from_pretrained_reads_a_sharded_export_exactly(tmp_path: Path) -> None:
    """Transfusion.from_pretrained on shards + index + config.yaml gives the saved tensors and the same losses."""
    from pretrain.config import load_config, save_config
    from pretrain.artifacts.export import write_shards
    from pretrain.model import Transfusion
    from batches import random_batch

    cfg = load_config(ROOT / "configs/tiny.yaml")
    torch.manual_seed(0)
    model = Transfusion(cfg.model).eval()
    write_shards(iter(model.state_dict().items()), tmp_path, torch.float32, 100_000)  # several shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    save_config(cfg, tmp_path / "config.yaml")
    loaded = Transfusion.from_pretrained(tmp_path)
    assert not loaded.training
    ref = model.state_dict()
    assert loaded.state_dict().keys() == ref.keys() and all(torch.equal(v, ref[k]) for k,
                                                            v in loaded.state_dict().items())
    batch = random_batch(cfg.model, batch_size=2, seq_len=64, seed=0)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a.lm_loss_sum, b.lm_loss_sum) and torch.equal(a.diffusion_loss_sum, b.diffusion_loss_sum)


def test_from_pretrained_names_the_keys_of_a_config_from_another_version(tmp_path: Path) -> None:
    """A saved model section with a key this code does not know, or without one it needs, raises ValueError
    naming those keys and the file (before: TypeError on unknown keys, silent defaults for missing ones)."""
    import yaml

    from pretrain.config import load_config, save_config
    from pretrain.model import Transfusion

    cfg = load_config(ROOT / "configs/tiny.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    saved["model"]["mystery_width"] = 3  # a key from a newer version
    del saved["model"]["rope_theta"]  # a key an older version did not write
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError) as err:
        Transfusion.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "config.yaml" in msg and "unknown keys model.mystery_width" in msg and "missing keys model.rope_theta" in msg
    saved["model"]["rope_theta"] = 10000.0
    del saved["model"]["mystery_width"]
    saved["model"]["max_seq_len"] = 256  # a key that moved: the error says where
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=r"model\.max_seq_len is now data\.seq_len"):
        Transfusion.from_pretrained(tmp_path)


def test_streamed_shards_read_back_with_safetensors_in_every_dtype(tmp_path: Path) -> None:
    """write_shards' own safetensors writer (header from the shapes, then one tensor at a time): safetensors'
    reader gives back each tensor cast to the export dtype bit for bit, 0-d and empty tensors included."""
    from pretrain.artifacts.export import write_shards

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g), "b.scalar": torch.tensor(3.25), "c.empty": torch.zeros(0, 4),
               "d.bias": torch.randn(33, generator=g) * 1e3}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shard_bytes, files in ((10**6, 1), (100, 2)):
            out = tmp_path / f"{dtype}-{shard_bytes}"
            out.mkdir()
            paths = write_shards(iter(tensors.items()), out, dtype, shard_bytes)
            assert len(paths) >= files
            got = {}
            for p in paths:
                got.update(load_file(p))
            assert got.keys() == tensors.keys()
            for k, t in tensors.items():
                assert got[k].dtype == dtype and got[k].shape == t.shape and torch.equal(got[k], t.to(dtype)), \
                    (dtype, k)


def test_dropping_mapped_checkpoint_pages_frees_rss_and_keeps_the_data(tmp_path: Path) -> None:
    """Pages of a memory-mapped CKPT/*_optim_states.pt that were read leave the process's RSS (RssFile in
    /proc/self/status) after _drop_mapped_pages(CKPT), not after another directory's, and the tensor still
    reads the same values."""
    from pretrain.artifacts.export import _drop_mapped_pages

    def rss_file_mib() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"flat": torch.arange(2**24, dtype=torch.float32)}, path)  # 64 MiB
    flat = torch.load(path, mmap=True, weights_only=True)["flat"]
    total = float(flat.sum(dtype=torch.float64))  # reads every page
    before = rss_file_mib()
    _drop_mapped_pages(tmp_path / "other")  # another checkpoint's files only: these pages stay
    assert rss_file_mib() > before - 8
    _drop_mapped_pages(tmp_path)
    after = rss_file_mib()
    assert before - after > 48, (before, after)
    assert float(flat.sum(dtype=torch.float64)) == total == (2**24 - 1) * 2**24 / 2
