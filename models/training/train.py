"""speckle-train: train one of the paper's denoisers at one noise factor, resumably.

    speckle-train --model br-unet --noise-factor 5 --data phantom --preset quick --out runs/br5
    speckle-train --model br-unet --target self-supervised --data my_scans/ --init runs/br/checkpoint.pt \
                  --noise-factor 0 --sigma-add 0 --out runs/mine      (fine-tune on your own scans)

The loop is loop.py, its settings config.py, its files checkpoint.py and plots.py. Runs under
torchrun as it is (`torchrun --nproc_per_node=N -m speckle_models.training.train ...`, distributed.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from speckle_models import MODEL_NAMES, NORMS
from speckle_models.training import distributed
from speckle_models.training.config import add_common_arguments, config_from_args
from speckle_models.training.loop import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speckle-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--noise-factor", type=float, default=1.0, help="multiplicative noise factor (1, 5, 10)")
    p.add_argument("--norm", choices=NORMS, help="U-Net norm (default: batchnorm D-U-Net, fused Br-U-Net)")
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's; Table 1 for paper)")
    p.add_argument("--dropout", type=float, help="dropout (default: Table 1)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start again over an existing run")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from this run's weights (fine-tuning); its width, norm and upsampling "
                        "are the defaults")
    add_common_arguments(p)
    return p


def init_defaults(args) -> None:
    """With --init, the architecture options not given come from its checkpoint."""
    from speckle_models.training.checkpoint import load_checkpoint

    saved = load_checkpoint(args.init)["config"]
    if not isinstance(saved, dict) or saved.get("model") != args.model:
        raise ValueError(f"--init {args.init} holds a {saved.get('model') if isinstance(saved, dict) else None!r} "
                         f"network, not --model {args.model}")
    for key in ("width", "norm", "upsample", "dropout"):
        if getattr(args, key, None) is None and saved.get(key) is not None:
            setattr(args, key, saved[key])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.init is not None:
            init_defaults(args)
        config = config_from_args(args, model=args.model, noise_factor=args.noise_factor,
                                  out=args.out, lr=args.lr, dropout=args.dropout, norm=args.norm,
                                  init=args.init)
        result = train(config, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        parser.error(str(e))
    finally:
        distributed.teardown_if_initialized()
    last = result.history[-1]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"model": config.model, "noise_factor": config.noise_factor, **last,
                          "total_time_s": result.total_time_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
