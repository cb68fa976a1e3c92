"""Pure selection and allocation math. Imports only torch (a test imports it with transformers blocked)."""

from tokendrop.methods.base import BudgetMethod, Layout, allocate, budget_tokens, top_k_sorted
from tokendrop.methods.controls import BaseOnly, RandomDrop, SpatialDrop
from tokendrop.methods.hired import HiRED, official_budget_split, paper_allocation

__all__ = [
    "BaseOnly",
    "BudgetMethod",
    "HiRED",
    "Layout",
    "RandomDrop",
    "SpatialDrop",
    "allocate",
    "budget_tokens",
    "official_budget_split",
    "paper_allocation",
    "top_k_sorted",
]
