"""The leaf both packages build on: facts shared by the data pipeline and the trainer.

`contract` imports neither `data_pipeline` nor `pretrain` (tests/test_import_graph.py checks it):

- `contract.batch`: the batch the loader hands the model (`TransfusionBatch`, `IGNORE_INDEX`)
- `contract.special_ids`: the special-token ids and vocabulary size recorded beside a tokenizer
- `contract.positions`: patches per image and the positions an image or a caption-image pair takes
- `contract.latents`: how VAE latents are stored in MDS shards (fp16, or bf16 bits as uint16)
- `contract.fileio`: atomic writes (a temporary file, then a rename), used by both packages
- `contract.dist_env`: where a process sits in the job (rank, local rank, world, master), from
  torch-style or Slurm variables, and a free port

This file imports nothing, so `python -m contract.dist_env` (run in every Slurm task) stays light.
"""
