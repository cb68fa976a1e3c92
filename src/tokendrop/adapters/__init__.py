"""One adapter per model family (the contract: `tokendrop.adapters.base`), and the in-LLM decoder loop.

The list of families is `tokendrop.registry.FAMILIES`; `tokendrop.registry.family_for(model)` picks
one. Adapters import transformers; `tokendrop.methods` never does.
"""
