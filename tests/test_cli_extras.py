"""The console scripts name the extra to install when one of its packages is missing, in one line."""
import subprocess
import sys

import pytest

from speckle_models import cli


def test_missing_package_is_one_line_naming_the_extra():
    with pytest.raises(SystemExit) as exit_info:
        cli.require_extra("speckle-train", "models", {"PIL": "pillow", "no_such_module_xyz": "no-such-dist"})
    message = str(exit_info.value.code)
    assert "\n" not in message
    assert "no-such-dist is not installed" in message and "speckle-kernels[models]" in message
    assert "pillow" not in message  # installed here: not named


def test_the_models_extra_lists_what_the_tools_import():
    # Every package the tools import at their top level must be in the checked list, or a user
    # without the extra gets a traceback instead of the line. Run in a fresh interpreter so that
    # earlier tests' imports do not hide one.
    code = ("import sys; import speckle_models.training.train, speckle_models.reproduction.reproduce, "
            "speckle_models.inference.denoise; print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    third_party = {"PIL", "skimage", "scipy", "tqdm", "matplotlib", "pydicom", "cv2", "pandas"}
    assert {name for name in third_party if name in loaded} <= set(cli.MODELS_EXTRA)
