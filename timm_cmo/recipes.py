"""The paper's training recipes (``hparams/*.yaml``), shipped with the package.

``train_cmo.py -c NAME`` takes a YAML file path, or the name of a packaged recipe
(``cifar10_lt_r100_ce_cmo`` or ``cifar10_lt_r100_ce_cmo.yaml``), so the recipes work after a plain
``pip install`` too.
"""
import os
from typing import List

__all__ = ['RECIPE_DIR', 'list_recipes', 'resolve_recipe']

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hparams')


def list_recipes() -> List[str]:
    """Names of the packaged recipes, sorted."""
    if not os.path.isdir(RECIPE_DIR):
        return []
    return sorted(f[:-len('.yaml')] for f in os.listdir(RECIPE_DIR) if f.endswith('.yaml'))


def resolve_recipe(name_or_path: str) -> str:
    """The YAML file of ``name_or_path``: an existing file, else (for a bare name) the packaged recipe.

    Raises:
        FileNotFoundError: neither exists (the message lists close recipe names).
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    name = os.path.basename(name_or_path)
    name = name[:-len('.yaml')] if name.endswith('.yaml') else name
    packaged = os.path.join(RECIPE_DIR, name + '.yaml')
    if name_or_path in (name, name + '.yaml') and os.path.isfile(packaged):  # a bare name, not a path
        return packaged
    import difflib
    close = difflib.get_close_matches(name, list_recipes(), n=3)
    raise FileNotFoundError(f'-c {name_or_path!r}: no such file or packaged recipe'
                            + (f'; did you mean {", ".join(close)}?' if close else
                               f' (packaged recipes: {", ".join(list_recipes()[:4])}, ...)'))
