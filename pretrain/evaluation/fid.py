"""FID between a folder of generated images and a folder of reference images, through torch-fidelity.

Optional (`pip install .[fid]`): torch-fidelity computes the Inception-v3 features (its
"inception-v3-compat" port of the TF-FID network, Heusel et al. 2017) and the Frechet distance.
Nothing is downloaded: the user supplies the Inception weights file locally (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` release asset). torch-fidelity opens it with full
pickle, so it is first opened here with `torch.load(weights_only=True)`, which refuses any file
that holds more than tensors.

    python -m pretrain.evaluation.fid --generated samples/ --reference coco_val/ --inception-weights pt_inception.pth
"""

from __future__ import annotations

import argparse
from pathlib import Path

INCEPTION = "inception-v3-compat"


def fid(generated: str | Path, reference: str | Path, weights: str | Path | None = None,
        feature_extractor: str = INCEPTION, cuda: bool = False) -> float:
    """Frechet distance between the feature statistics of two image folders (PNG/JPEG, searched recursively).

    feature_extractor: a name registered with torch_fidelity (default Inception-v3, which needs
    `weights`). Raises FileNotFoundError for a missing folder or weights file, ValueError for
    weights that are not a plain tensor file, ImportError (with the install line) without torch-fidelity.
    """
    try:
        import torch_fidelity
    except ImportError as e:
        raise ImportError("FID needs torch-fidelity: pip install '.[fid]'") from e
    for d in (generated, reference):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"{d}: not a folder of images")
    if feature_extractor == INCEPTION:
        _check_weights(weights)
    m = torch_fidelity.calculate_metrics(
        input1=str(generated), input2=str(reference), fid=True, feature_extractor=feature_extractor,
        feature_extractor_weights_path=str(weights) if weights else None, cuda=cuda, cache=False,
        samples_find_deep=True, verbose=False,
    )
    return float(m["frechet_inception_distance"])


def _check_weights(weights: str | Path | None) -> None:
    import torch

    if not weights:
        raise FileNotFoundError("FID needs --inception-weights: nothing is downloaded; get torch-fidelity's "
                                "weights-inception-2015-12-05-6726825d.pth and pass its path")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: Inception weights file not found")
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal means: not a plain tensor file
        raise ValueError(f"{weights}: not a plain tensor state dict ({type(e).__name__}); "
                         "refusing to unpickle it") from e


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generated", required=True, help="folder of generated images")
    ap.add_argument("--reference", required=True, help="folder of reference images")
    ap.add_argument("--inception-weights", default=None, help="local Inception-v3 weights (torch-fidelity's .pth)")
    ap.add_argument("--cuda", action="store_true")
    a = ap.parse_args(argv)
    try:
        print(f"FID {fid(a.generated, a.reference, a.inception_weights, cuda=a.cuda):.4f}")
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
