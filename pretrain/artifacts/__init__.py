"""The artifacts room: export of a DeepSpeed checkpoint (safetensors, streamed), Hugging Face Llama in/out,
and `train.init_from` reading. Reads the training room's checkpoints; `python -m pretrain.artifacts.export`.
"""
