"""Training recipes that use tokendrop, kept in the repository and not installed with the wheel.

``recipes.default_model`` trains the small LLaVA-NeXT bundled in ``src/tokendrop/assets/model``;
``python -m recipes.default_model train`` runs it from the root of a clone (docs/training_recipe.md).
"""
