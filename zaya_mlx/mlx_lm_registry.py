"""Make ZAYA a model mlx-lm can run, by two routes.

In Python: mlx-lm finds a model's code by importing `mlx_lm.models.<model_type>`. `register()` (run by
`import zaya_mlx`) adds an import hook that answers that one name with a module re-exporting `zaya_mlx.model`
(`Model`, `ModelArgs`, whose `sanitize` maps every checkpoint layout to our names). Then, after
`import zaya_mlx`, `mlx_lm.load(folder)` works on any ZAYA folder. The hook is cheap (nothing heavy is imported
until mlx-lm asks for the module), and it stands aside if mlx-lm ships its own `models/zaya.py`
(`register(force=True)` overrides that).

mlx-lm's own commands (`mlx_lm.generate`, `mlx_lm.chat`, `mlx_lm.server`) never import zaya_mlx, so the folders
`zaya quantize` writes carry a one-line model file that does (`write_model_file`), named by config.json's
`model_file` key: with `--trust-remote-code` mlx-lm builds the model from it, before and instead of any
`mlx_lm.models.zaya`, so these folders keep our semantics whatever model module mlx-lm ships.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

MODULE = "mlx_lm.models.zaya"
MODEL_FILE = "zaya_mlx_model.py"
MODEL_FILE_TEXT = '''"""ZAYA1 for mlx-lm's commands (with --trust-remote-code): zaya-mlx's model."""

try:
    from zaya_mlx.model import Model, ModelArgs  # noqa: F401
except ImportError as e:
    raise ImportError("this folder runs zaya-mlx's ZAYA1 model: install zaya-mlx in the Python that runs mlx-lm") from e
'''


class _ZayaModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == MODULE:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None  # a fresh module object

    def exec_module(self, module):
        from . import model as ours

        for name, value in vars(ours).items():
            if not name.startswith("__"):
                setattr(module, name, value)
        module.__doc__ = ours.__doc__


def _upstream_has_zaya() -> bool:
    spec = importlib.util.find_spec("mlx_lm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "models" / "zaya.py").exists() for p in spec.submodule_search_locations)


def is_registered() -> bool:
    return any(isinstance(f, _ZayaModuleFinder) for f in sys.meta_path)


def register(force: bool = False) -> bool:
    """Install the hook (idempotent). Returns whether `mlx_lm.models.zaya` is ours."""
    if is_registered():
        return True
    if not force and _upstream_has_zaya():
        return False
    if force:
        sys.modules.pop(MODULE, None)
    sys.meta_path.insert(0, _ZayaModuleFinder())
    return True


def write_model_file(folder) -> dict:
    """Write the model file into `folder`; returns the config.json entries that name it."""
    (Path(folder) / MODEL_FILE).write_text(MODEL_FILE_TEXT)
    return {"model_file": MODEL_FILE}
