"""The InternVL lineage: InternVL3 / 3.5 in transformers' format (`InternVLForConditionalGeneration`):
the declaration and the transformers seams (`internvl.py`), one pass of the InternViT tower that reads
features and score rows (`vision.py`) and the tiny random builder (`tiny.py`).
"""
