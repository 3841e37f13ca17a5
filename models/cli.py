"""The console scripts' entry points: each checks that the packages its tools need are installed
(the `models` extra, and `dicom` where a DICOM file is named) before it imports them, so a
missing extra is one line naming what to install, not a traceback."""
from __future__ import annotations

import importlib.util
import sys

# import name -> distribution, for the message
MODELS_EXTRA = {"PIL": "pillow", "skimage": "scikit-image", "scipy": "scipy", "tqdm": "tqdm",
                "matplotlib": "matplotlib", "tifffile": "tifffile"}


def require_extra(command: str, extra: str, modules: dict[str, str]) -> None:
    """Exit with one line if any of `modules` (import name -> distribution) is missing."""
    missing = [dist for name, dist in modules.items() if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"{command}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                 f"install the {extra!r} extra: pip install 'speckle-kernels[{extra}]'")


def train() -> int:
    require_extra("speckle-train", "models", MODELS_EXTRA)
    from speckle_models.training.train import main

    return main()


def reproduce() -> int:
    require_extra("speckle-reproduce", "models", MODELS_EXTRA)
    from speckle_models.reproduction.reproduce import main

    return main()


def denoise() -> int:
    require_extra("speckle-denoise", "models", MODELS_EXTRA)
    from speckle_models.inference.denoise import main

    return main()
