"""The Gemma 4 lineage (`Gemma4ForConditionalGeneration`): the declaration and its transformers seams
(`gemma4.py`), the received-attention scores of its vision encoder mapped onto its pooled tokens
(`scoring.py`), its own visual-token budget as a control (`control.py`) and its tiny random builder
(`tiny.py`).
"""
