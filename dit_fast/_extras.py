"""Optional dependencies, checked before any long work starts.

The package itself needs only torch, numpy, tqdm and safetensors. The CLIs that write images or run
the demo need more; `require` names the missing packages and the pip extra (pyproject.toml's
[project.optional-dependencies]) that installs them, in one line.
"""
import importlib.util
from typing import Sequence

# import name -> pip package
PIP_NAMES = {"PIL": "pillow", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "diffusers": "diffusers"}


class MissingDependency(ImportError):
    """An optional package is not installed; the message says what to install."""


def missing(modules: Sequence[str]) -> list:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(modules: Sequence[str], extra: str, purpose: str) -> None:
    """Raise MissingDependency unless every module in `modules` can be imported."""
    gone = missing(modules)
    if gone:
        pkgs = " ".join(PIP_NAMES.get(m, m) for m in gone)
        raise MissingDependency(f"{purpose} needs {pkgs}, which is not installed: pip install 'dit_fast[{extra}]' "
                                f"(from a checkout: pip install -e '.[{extra}]'; or: pip install {pkgs})")
