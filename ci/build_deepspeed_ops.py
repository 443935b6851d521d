"""Build DeepSpeed's JIT ops that CPU runs load (cpu_adam, shm_comm) once, into this venv's torch_extensions/.

Where: $TORCH_EXTENSIONS_DIR when set, else VENV/torch_extensions (`pretrain.train.distributed.torch_extensions_dir`;
the trainer sets the same variable before DeepSpeed loads an op), never the ~/.cache/torch_extensions that
every venv of the user shares (two venvs rebuilt the op for each other at each launch, and raced).

`make install` runs it with the venv's bin first on PATH. Why that matters: torch JIT-builds ops
with the first `ninja` on PATH, and this machine has two (apt's 1.11 in /usr/bin, pip's 1.13 in the
venv). Each version discards the other's build log (1.12 changed the command-line hash), so every
launch that found the other ninja rebuilt cpu_adam (two cc1plus, about a minute on 2 idle cores).
tests/conftest.py puts the venv's bin first on PATH for every test process for the same reason.

    PATH=.venv/bin:$PATH .venv/bin/python ci/build_deepspeed_ops.py
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    venv_ninja = Path(sys.executable).parent / "ninja"
    found = shutil.which("ninja")
    if venv_ninja.exists() and found != str(venv_ninja):
        print(f"error: `ninja` on PATH is {found}, not {venv_ninja}; run with PATH={venv_ninja.parent}:$PATH "
              "(a different ninja would rebuild the ops at every launch)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pretrain.train.distributed import use_env_torch_extensions

    where = use_env_torch_extensions()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder") if acc.device_name() == "cpu" else ("CPUAdamBuilder",):
        t0 = time.time()
        builder = acc.create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"{name}: not available with the {acc.device_name()} accelerator; skipped")
            continue
        builder.load(verbose=False)
        print(f"{name}: ready in {time.time() - t0:.0f}s in {where or '~/.cache/torch_extensions'} (ninja {found})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
