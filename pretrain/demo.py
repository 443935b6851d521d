"""The tiny end-to-end run on CPU: synthetic data -> tokenizer, VAE, shards -> 2-rank ZeRO-2 training
(configs/demo.yaml)
-> export -> evaluation (pixel-judged text->image samples, captions, text loss; a PNG grid and a
report). `make demo` runs it.

    python -m pretrain.demo --out demo_out [--train-seconds 500 | --steps N] [--launcher deepspeed|torchrun] [--fresh]
    python -m pretrain.demo --summarise demo_1 demo_2 demo_3   # mean (range) of each figure over finished runs

Every stage is the same command a user runs on real data; this script only chains them.

The training budget is time, not steps: machines of the same kind differ up to ~2x in step time, so
unless --steps is given the demo first times 60 steps of the same trainer (`calibrate`) and trains as
many steps as fit in --train-seconds (rounded down to 100, within [MIN_STEPS, MAX_STEPS]); the choice is
kept in OUT/steps.json and reused when the demo is run again without --fresh.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from contract.dist_env import free_port

ROOT = Path(__file__).resolve().parents[1]


STAGE_SECONDS: dict[str, float] = {}  # wall time of each stage, for the summary

CALIBRATION_STEPS, CALIBRATION_SKIP = 60, 20  # timed steps, of which the first are warm-up
MIN_STEPS, MAX_STEPS = 1000, 12000  # the step count a time budget may choose
#: the main run's time beyond its steps (start-up, checkpoints, validation) is not in the budget; the
#: chosen steps leave this margin for steps slower than the calibration's (a busier machine)
STEP_MARGIN = 1.05
EVAL_PER_COMBO, EVAL_CAPTIONS = 3, 243  # the demo's evaluation size (see main)


def run(cmd: list[str], env: dict[str, str] | None = None, stage: str = "") -> None:
    """Run one stage, echoing the command and recording its wall time; stop the demo if it fails."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    STAGE_SECONDS[stage or cmd[2]] = time.time() - t
    print(f"  ({time.time() - t:.0f}s)", flush=True)


def summary(out: Path, run_dir: Path, export_dir: Path) -> str:
    """Where everything is, the evaluation figures (OUT/eval/report.json of pretrain.evaluation.evaluate) and the
    wall time of each stage."""
    ev = out / "eval"
    lines = ["", "demo done:",
             f"  run directory   {run_dir}",
             f"  TensorBoard     tensorboard --logdir {run_dir / 'tensorboard'}",
             f"  export          {export_dir}"]
    if (out / "steps.json").is_file():
        c = json.loads((out / "steps.json").read_text())
        lines.append(f"  training steps  {c['steps']} (calibrated: {c['step_seconds']:.4f} s/step, "
                     f"budget {c['budget_seconds']:.0f} s; OUT/steps.json)")
    pngs = sorted(ev.glob("*.png"))
    lines.append(f"  sample PNGs     {len(pngs)} in {ev}" + "".join(f"\n                  {p.name}" for p in pngs))
    if (ev / "report.json").is_file():
        from pretrain.evaluation.evaluate import flat_scalars

        figures = flat_scalars(json.loads((ev / "report.json").read_text()))
        lines.append(f"  evaluation      {ev / 'report.json'}"
                     + "".join(f"\n                  {k} {v:.4g}" for k, v in figures.items()))
    lines.append("  wall time       " + ", ".join(f"{k} {v:.0f}s" for k, v in STAGE_SECONDS.items())
                 + f"; total {sum(STAGE_SECONDS.values()):.0f}s")
    return "\n".join(lines)


def steps_for_budget(step_seconds: float, budget_seconds: float) -> int:
    """Training steps that fit `budget_seconds` at `step_seconds` each (with STEP_MARGIN), rounded down to a
    hundred and clamped to [MIN_STEPS, MAX_STEPS]."""
    fit = int(budget_seconds / (step_seconds * STEP_MARGIN)) // 100 * 100
    return max(MIN_STEPS, min(MAX_STEPS, fit))


def calibrate(train_cmd: list[str], run_dir: Path, env: dict[str, str], budget_seconds: float) -> dict:
    """Time CALIBRATION_STEPS steps of `train_cmd` (the main run's command) in `run_dir`; return
    {"steps", "step_seconds", "budget_seconds"}: the wall time between metrics.jsonl rows after the warm-up."""
    run(train_cmd + [f"train.run_dir={run_dir}", f"train.steps={CALIBRATION_STEPS}", "checkpoint.resume=none",
                     "checkpoint.every=0", "logging.val_every=0", "logging.sample_every=0"], env, stage="calibrate")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall"] for r in rows if "wall" in r][CALIBRATION_SKIP:]
    step_seconds = (walls[-1] - walls[0]) / (len(walls) - 1)
    steps = steps_for_budget(step_seconds, budget_seconds)
    print(f"  calibration: {step_seconds:.4f} s/step on this machine -> {steps} steps for a {budget_seconds:.0f} s "
          f"training budget (--steps N fixes the count)", flush=True)
    return {"steps": steps, "step_seconds": step_seconds, "budget_seconds": budget_seconds}


def chosen_steps(out: Path, train_cmd: list[str], env: dict[str, str], budget_seconds: float, fresh: bool) -> int:
    """The step count of OUT/steps.json when it holds one for this budget (a rerun resumes the same run),
    else a new calibration's, saved there."""
    saved = out / "steps.json"
    if not fresh and saved.is_file():
        choice = json.loads(saved.read_text())
        if choice.get("budget_seconds") == budget_seconds:
            print(f"  steps: {choice['steps']} (from {saved}; --fresh recalibrates)", flush=True)
            return int(choice["steps"])
    choice = calibrate(train_cmd, out / "calibrate", env, budget_seconds)
    saved.write_text(json.dumps(choice) + "\n")
    return int(choice["steps"])


#: the figures README.md quotes from a demo's report (flat_scalars names -> README wording)
HEADLINE = {
    "eval/vae/seen/all_three": "VAE reconstructions, all three right",
    "eval/text_to_image/seen/color": "text -> image colour",
    "eval/text_to_image/seen/shape": "text -> image shape",
    "eval/text_to_image/seen/place": "text -> image place",
    "eval/text_to_image/seen/all_three": "text -> image all three",
    "eval/text_to_image/held_out/all_three": "text -> image all three, held-out combinations",
    "eval/captions/seen/all_three": "caption all three words right",
    "eval/captions/held_out/all_three": "caption all three, held-out combinations",
    "eval/text/loss": "text loss (nats/token)",
}


def summarise_runs(outs: list[Path]) -> str:
    """Mean and range of every evaluation figure over several finished demos: a Markdown table with one
    row per figure (flat_scalars' names; accuracies in %), "mean (min-max)" over the runs, and the
    runs' training steps and total wall time where their OUT/steps.json holds them.

    Raises FileNotFoundError naming the first OUT without eval/report.json (a demo that did not finish).
    """
    from pretrain.evaluation.evaluate import flat_scalars

    figures: dict[str, list[float]] = {}
    steps = []
    for out in outs:
        report = Path(out) / "eval" / "report.json"
        if not report.is_file():
            raise FileNotFoundError(f"{report}: no evaluation report; finish that demo (python -m pretrain.demo "
                                    f"--out {out}) or leave it out")
        for k, v in flat_scalars(json.loads(report.read_text())).items():
            figures.setdefault(k, []).append(v)
        if (Path(out) / "steps.json").is_file():
            steps.append(int(json.loads((Path(out) / "steps.json").read_text())["steps"]))
    n = len(outs)
    lines = [f"demo figures over {n} run{'s' * (n != 1)}: " + ", ".join(str(o) for o in outs),
             *( [f"training steps: {', '.join(map(str, steps))}"] if steps else []),
             "", "| figure | mean (range) |", "|---|---|"]
    order = [k for k in HEADLINE if k in figures] + sorted(k for k in figures if k not in HEADLINE)
    for k in order:
        vals = figures[k]
        pct = "/text/" not in k  # accuracies (0-1) print as %; text loss and perplexity as they are
        f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")  # noqa: E731
        cell = f"{f(sum(vals) / len(vals))}{'%' if pct else ''} ({f(min(vals))}-{f(max(vals))}, n={len(vals)})"
        lines.append(f"| {HEADLINE.get(k, k)} | {cell} |")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def launcher_cmd(launcher: str, nproc: int) -> list[str]:
    """The multi-process launch prefix for `-m pretrain.train`."""
    port = str(free_port())
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]


def main(argv: list[str] | None = None) -> int:
    """Chain the stages; print where the outputs are."""
    ap = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--out", default="demo_out", type=Path, help="output directory (data, run, export, eval)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: as many as fit --train-seconds)")
    ap.add_argument("--train-seconds", type=float, default=500.0,
                    help="time budget of the training steps; the calibration run measures this machine's step")
    ap.add_argument("--nproc", type=int, default=2, help="training processes (ranks)")
    ap.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed", help="multi-process launcher")
    ap.add_argument("--fresh", action="store_true", help="rebuild the data and restart training from scratch")
    ap.add_argument("--summarise", nargs="+", type=Path, metavar="OUT",
                    help="run nothing: print mean and range per figure over these finished demos' OUT/eval/report.json")
    a = ap.parse_args(argv)
    if a.summarise:
        print(summarise_runs(a.summarise))
        return 0
    out = a.out.resolve()
    data, run_dir, export_dir = out / "data", out / "run", out / "export"
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PATH": f"{Path(py).parent}:{os.environ.get('PATH', '')}"}
    if a.fresh or not (data / "data.yaml").is_file():
        run([py, "-m", "data_pipeline.demo_data", "--out", str(data)], stage="data")
    resume = "none" if a.fresh else "auto"
    module = ["--module" if a.launcher == "deepspeed" else "-m", "pretrain.train"]  # deepspeed has no -m
    def train_command() -> list[str]:  # a fresh rendezvous port for each launch
        return launcher_cmd(a.launcher, a.nproc) + module + [
            # demo.yaml: the small model's switches
            "--config", f"configs/tiny.yaml,configs/demo.yaml,{data / 'data.yaml'}"]

    steps = a.steps or chosen_steps(out, train_command(), env, a.train_seconds, a.fresh)
    run(train_command() + [
        f"train.run_dir={run_dir}", f"train.steps={steps}",
        f"checkpoint.resume={resume}", f"checkpoint.every={max(steps // 3, 1)}",
        f"logging.val_every={max(steps // 6, 1)}", "logging.sample_every=0",  # the demo's overheads: few pauses
    ], env, stage="train")
    run([py, "-m", "pretrain.artifacts.export", "--run-dir", str(run_dir), "--out", str(export_dir)], stage="export")
    # 3 samples per combination (462 prompts) and 243 captions: at 80% a standard error of 1.9 points, where
    # pretrain.evaluation.evaluate's default 154 prompts leave 3.2, as wide as the margins to the targets
    # (docs/quality.md)
    run([py, "-m", "pretrain.evaluation.evaluate", "--model", str(export_dir), "--out", str(out / "eval"),
         "--per-combo", str(EVAL_PER_COMBO), "--captions", str(EVAL_CAPTIONS)], stage="evaluate")
    print(summary(out, run_dir, export_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
