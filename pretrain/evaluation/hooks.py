"""The trainer's periodic evaluation hook: the synthetic-task evaluation on the training model, to TensorBoard."""

from __future__ import annotations

import logging
from pathlib import Path

from contract.special_ids import load_special_ids
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.vae import load_vae
from pretrain.evaluation import evaluate
from pretrain.train.hooks import HookContext

log = logging.getLogger("pretrain")


def periodic_evaluation(ctx: HookContext) -> None:
    """Every logging.eval_every steps: `evaluate.evaluate` on the training model.

    Every rank runs it (ZeRO-3 forwards are collective); rank 0 writes the scalars, the report
    (RUN_DIR/eval/step_N/report.json) and the sample grid.
    """
    cfg, lg = ctx.cfg, ctx.cfg.logging
    st = evaluate.EvalSettings(steps=lg.sample_steps, cfg_scale=lg.sample_cfg_scale, sampler=lg.sample_sampler,
                               seed=cfg.train.seed)
    report, pixels, prompts = evaluate.evaluate(ctx.model, load_special_ids(cfg.data.tokenizer),
                                                Tokenizer(cfg.data.tokenizer), load_vae(cfg.data.vae), st)
    ctx.writer.scalars(evaluate.flat_scalars(report), ctx.step)
    if ctx.is_main:
        out = evaluate.write_report(report, pixels, prompts,
                                    Path(cfg.train.run_dir) / "eval" / f"step_{ctx.step:07d}")
        log.info("evaluation at step %d (%s):\n%s", ctx.step, out, evaluate.table(report))
