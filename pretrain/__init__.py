"""Transfusion pretraining: model, DeepSpeed ZeRO-3 trainer, checkpoints, export and generation."""
