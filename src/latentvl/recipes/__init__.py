"""Recipes: experiments built from the library's layers, beside them rather than inside.

A recipe reads top to bottom: its data, its arms, its training runs, its measurements and its report,
with its settings in a YAML file next to its code. Nothing in ``latentvl``'s core layers imports a recipe.

- :mod:`latentvl.recipes.demo` - ``latentvl demo``: the method and its controls on a synthetic task.
"""
