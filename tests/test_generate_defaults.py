"""Generation as users call it: one home for the sampler defaults (issue 26), the export's recorded sampling as
the default of the CLI, the Python API and the evaluation, samples named by their prompt (issue 29.5), prompts
longer than the trained sequence length (issue 27.6), and docs/generate.md's captioning snippet run as written.

The export is built here in seconds (a sentencepiece model trained on a few sentences, a 1-step VAE, a random
tiny model): no demo data.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pretrain.config import LoggingConfig, load_config, save_config
from pretrain.inference import generate as gen
from pretrain.model import Transfusion
from pretrain.model.config import default_sampler

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
WORDS = "red green blue circle square triangle top left right bottom center the a of and at is in".split()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """An export directory (pretrain.artifacts.export's layout): trained length 64, recorded sampling ddpm / 3 steps /
    CFG 2."""
    from data_pipeline import images, synthetic, tokenizer, vae

    tmp = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    tokenizer.train([" ".join(rng.choice(WORDS, size=12)) for _ in range(300)], tmp / "spm.model", vocab_size=300)
    pix = [images.load_image(synthetic.png_bytes(synthetic.draw_shape(*synthetic.random_scene(rng), 32)), 32)
           for _ in range(4)]
    vae_dir = vae.train_vae(torch.from_numpy(np.stack(pix)), tmp / "vae",
                            vae.VaeTrainSettings(steps=1, batch_size=4, latent_channels=4, width=8, sample_every=1))
    cfg = load_config("configs/tiny.yaml", [
        "model.latent_channels=4", "model.latent_size=4", "model.patch_size=2", f"data.tokenizer={tmp / 'spm.model'}",
        f"data.vae={vae_dir}", f"data.seq_len={SEQ_LEN}", "logging.sample_steps=3", "logging.sample_cfg_scale=2.0"])
    out = tmp / "export"
    out.mkdir()
    torch.manual_seed(0)
    model = Transfusion(cfg.model)
    with torch.no_grad():  # the output layer starts at zero: give it weights so samples depend on steps and CFG
        model.patch_decoder.proj.weight.normal_(0, 0.05)
    save_file(model.state_dict(), out / "model.safetensors")
    shutil.copyfile(tmp / "spm.model", out / "tokenizer.model")
    shutil.copyfile(tmp / "spm.json", out / "tokenizer.json")
    shutil.copytree(vae_dir, out / "vae")
    save_config(cfg, out / "config.yaml")
    return out


# ---- issue 26: one sampler default, the objective's own ----

def test_flow_objective_alone_is_a_valid_config_and_samples_with_default_arguments() -> None:
    """Before: `model.objective=flow` alone was a ConfigError (logging.sample_sampler defaulted to ddpm) and
    generate_images(...) with default arguments raised (its sampler defaulted to ddim)."""
    cfg = load_config(overrides=["model.objective=flow"])
    assert cfg.logging.sample_sampler is None
    torch.manual_seed(0)
    model = Transfusion(load_config("configs/tiny.yaml", ["model.objective=flow"]).model).eval()
    from contract.special_ids import SpecialIds
    sp = SpecialIds(vocab_size=model.cfg.vocab_size, bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0)
    got = gen.generate_images(model, [[5, 6]], sp, gen.ImageSampling(steps=2))
    assert torch.equal(got, gen.generate_images(model, [[5, 6]], sp, gen.ImageSampling(steps=2, sampler="euler")))


def test_every_entry_point_defaults_to_the_one_resolver() -> None:
    """No entry point carries its own sampler, steps or CFG: each leaves them None for resolve_sampling."""
    from pretrain.evaluation import evaluate

    assert LoggingConfig().sample_sampler is None
    assert gen.ImageSampling() == gen.ImageSampling(None, None, None)
    sig = inspect.signature(gen.generate_images).parameters
    assert sig["image"].default == gen.ImageSampling()
    st = evaluate.EvalSettings()
    assert (st.steps, st.cfg_scale, st.sampler) == (None, None, None)
    a = gen._parser().parse_args(["--model", "m"])
    assert (a.steps, a.cfg_scale, a.sampler) == (None, None, None)
    d = LoggingConfig()
    for objective in ("ddpm", "flow"):
        model = Transfusion(load_config("configs/tiny.yaml", [f"model.objective={objective}"]).model)
        assert gen.resolve_sampling(model) == gen.ImageSampling(d.sample_steps, d.sample_cfg_scale,
                                                                default_sampler(objective))
    assert default_sampler("flow") == "euler" and default_sampler("ddpm") == "ddpm"


# ---- issue 29.5: the export's recorded sampling is the default everywhere ----

def test_python_api_cli_and_evaluation_use_the_exports_recorded_sampling(export: Path, tmp_path: Path, capsys) -> None:
    from pretrain.evaluation import evaluate

    model, sp, _ = gen.load_exported(export)
    assert model.export_record == gen.ExportRecord(gen.ImageSampling(3, 2.0, "ddpm"), SEQ_LEN)
    prompts = [[5, 6, 7]]
    default = gen.generate_images(model, prompts, sp)
    assert torch.equal(default, gen.generate_images(model, prompts, sp, gen.ImageSampling(3, 2.0, "ddpm")))
    assert not torch.allclose(default, gen.generate_images(model, prompts, sp, gen.ImageSampling(4, 2.0, "ddpm")))
    assert not torch.allclose(default, gen.generate_images(model, prompts, sp, gen.ImageSampling(3, 3.0, "ddpm")))
    # the evaluation's settings resolve to the same record (its report holds the values used)
    im = gen.resolve_sampling(model, gen.ImageSampling(evaluate.EvalSettings().steps, None, None))
    assert im == model.export_record.sampling
    gen.main(["--model", str(export), "--prompt", "a red circle", "--out", str(tmp_path)])
    assert "sampling: ddpm, 3 steps, CFG 2.0 (unset flags: as the export recorded)" in capsys.readouterr().err
    gen.main(["--model", str(export), "--prompt", "a red circle", "--out", str(tmp_path), "--steps", "2", "--sampler",
              "ddim", "--cfg-scale", "1"])
    assert "sampling: ddim, 2 steps, CFG 1.0\n" in capsys.readouterr().err


def test_num_samples_per_prompt_named_by_the_prompt(export: Path, tmp_path: Path, capsys) -> None:
    gen.main(["--model", str(export), "--out", str(tmp_path), "--steps", "2", "--num-samples", "2",
              "--prompt", "A red circle, top left", "--prompt", "a red circle top-left!"])
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["a-red-circle-top-left-2_000.png", "a-red-circle-top-left-2_001.png",
                     "a-red-circle-top-left_000.png", "a-red-circle-top-left_001.png"]
    a, b = (np.asarray(Image.open(tmp_path / f"a-red-circle-top-left_00{k}.png")) for k in (0, 1))
    assert not np.array_equal(a, b)  # two samples, two noises
    out = capsys.readouterr().out
    assert "'A red circle, top left' -> " + str(tmp_path / "a-red-circle-top-left_001.png") in out
    gen.main(["--model", str(export), "--out", str(tmp_path / "m"), "--steps", "2", "--num-samples", "2",
              "--mixed", "a blue square", "--force-image", "--max-new-tokens", "2"])
    assert sorted(p.name for p in (tmp_path / "m").glob("*.png")) == ["a-blue-square_000_img00.png",
                                                                      "a-blue-square_001_img00.png"]


# ---- issue 27.6: prompts longer than the trained sequence length ----

def _long(n: int) -> list[int]:
    return [5 + i % 50 for i in range(n)]


def test_long_prompt_is_an_error_naming_the_limit_or_truncated_from_the_left(export: Path) -> None:
    """Before: a prompt past the trained length was silently generated from (degenerate text, exit 0)."""
    model, sp, _ = gen.load_exported(export)
    P = model.cfg.patches_per_image
    prompt = _long(100)  # 1 + 100 + 8 = 109 > 64
    with pytest.raises(gen.PromptTooLong,
                       match=f"1 \\+ 100 positions \\+ 8 to generate = 109 exceed .* length {SEQ_LEN}"):
        gen.generate_text(model, [prompt], sp, max_new_tokens=8)
    with pytest.warns(gen.PromptTruncated, match="dropped 45 positions from the left \\(45 tokens, 0 images\\)"):
        got = gen.generate_text(model, [prompt], sp, max_new_tokens=8, on_long_prompt="truncate")
    assert got == gen.generate_text(model, [prompt[-(SEQ_LEN - 1 - 8):]], sp, max_new_tokens=8)  # the newest 55 kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits: no warning, unchanged
        assert gen.generate_text(model, [prompt[:40]], sp, 8, on_long_prompt="truncate") == \
            gen.generate_text(model, [prompt[:40]], sp, 8)
    # an image in the prompt: it goes whole when its positions do not fit
    img = torch.randn(model.cfg.latent_channels, model.cfg.latent_size, model.cfg.latent_size)
    with pytest.warns(gen.PromptTruncated, match=f"dropped {P + 2 + 5} positions .*\\(5 tokens, 1 images\\)"):
        got = gen.generate_text(model, [_long(60)], sp, 8, images=img[None], on_long_prompt="truncate")
    assert got == gen.generate_text(model, [_long(60)[5:]], sp, 8)
    # images: BOS caption BOI + P patches; mixed: the new tokens and (P + 1) per image to generate
    with pytest.raises(gen.PromptTooLong, match=f"length {SEQ_LEN}"):
        gen.generate_images(model, [_long(SEQ_LEN - 1 - P)], sp, gen.ImageSampling(steps=1))
    # fits exactly
    assert gen.generate_images(model, [_long(SEQ_LEN - 2 - P)], sp, gen.ImageSampling(steps=1)).shape[0] == 1
    with pytest.raises(gen.PromptTooLong, match=f"length {SEQ_LEN}"):
        gen.generate(model, [[_long(SEQ_LEN - 10 - P - 1)]], sp, max_new_tokens=10, max_images=1)
    with pytest.raises(gen.PromptTooLong, match="lower --max-new-tokens"):  # nothing to cut: refused in both modes
        gen.generate_text(model, [[5]], sp, max_new_tokens=SEQ_LEN, on_long_prompt="truncate")


def test_cli_long_prompt_error_or_truncate(export: Path, tmp_path: Path, capsys) -> None:
    long_text = " ".join(["red circle at the top left"] * 40)
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", str(export), "--text", long_text, "--max-new-tokens", "4"])
    msg = str(e.value.code)
    assert msg.startswith("error: prompt 0: ") and f"trained sequence length {SEQ_LEN}" in msg
    assert "--on-long-prompt" in msg
    with pytest.warns(gen.PromptTruncated, match=r"dropped \d+ positions from the left"):
        gen.main(["--model", str(export), "--text", long_text, "--max-new-tokens", "4", "--on-long-prompt", "truncate"])
    assert capsys.readouterr().out.count(" -> ") == 1


# ---- issue 29.5: the documented captioning snippet runs as written ----

def test_docs_caption_any_image_snippet_runs(export: Path, tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "generate.md").read_text()
    section = doc[doc.index("## Captioning any image from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(photo)
    code = code.replace('"exports/tiny"', repr(str(export))).replace('"photo.jpg"', repr(str(photo)))
    ns: dict = {}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "docs/generate.md", "exec"), ns)  # noqa: S102 - our own documentation
    assert isinstance(ns["caption"], str) and buf.getvalue() == ns["caption"] + "\n"
    assert ns["pixels"].shape == (1, 3, 32, 32)  # the export's image size, from its latent size and the VAE


def test_cli_caption_of_an_animated_image_is_refused_or_takes_the_chosen_frame(
        export: Path, tmp_path: Path, capsys) -> None:
    """Issue 27.5 in generation's image reader: an animated GIF is refused by default (its first frame is often
    blank), `--animated-frame K` captions frame K."""
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), (255, 255, 255)), Image.new("RGB", (32, 32), (255, 0, 0))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", str(export), "--caption", str(gif), "--max-new-tokens", "2"])
    assert str(gif) in str(e.value.code) and "animated: 2 frames" in str(e.value.code)
    gen.main(["--model", str(export), "--caption", str(gif), "--max-new-tokens", "2", "--animated-frame", "1"])
    assert capsys.readouterr().out.startswith(f"{gif} -> ")
