"""Token-dropping methods: configs and selection math, one file per method (imports only torch, lazily).

A test imports this package with transformers blocked; `tokendrop methods` lists it without torch.
"""

from tokendrop.methods.base import InLLMMethod, Method, PreLLMMethod, Score
from tokendrop.methods.base_only import BaseOnly
from tokendrop.methods.cdpruner import CDPruner
from tokendrop.methods.dart import DART
from tokendrop.methods.divprune import DivPrune
from tokendrop.methods.dominant_drop import DominantDrop
from tokendrop.methods.fastv import FastV
from tokendrop.methods.fastervlm import FasterVLM
from tokendrop.methods.hiprune import HiPrune
from tokendrop.methods.hired import HiRED, official_budget_split, paper_allocation
from tokendrop.methods.layout import Layout, allocate, budget_tokens, top_k_sorted
from tokendrop.methods.pyramiddrop import PyramidDrop
from tokendrop.methods.random_drop import RandomDrop
from tokendrop.methods.spatial_drop import SpatialDrop
from tokendrop.methods.vispruner import VisPruner
from tokendrop.methods.visionzip import VisionZip

__all__ = [
    "BaseOnly",
    "CDPruner",
    "DART",
    "DivPrune",
    "DominantDrop",
    "FastV",
    "FasterVLM",
    "HiPrune",
    "HiRED",
    "InLLMMethod",
    "Layout",
    "Method",
    "PreLLMMethod",
    "PyramidDrop",
    "RandomDrop",
    "Score",
    "SpatialDrop",
    "VisPruner",
    "VisionZip",
    "allocate",
    "budget_tokens",
    "official_budget_split",
    "paper_allocation",
    "top_k_sorted",
]
