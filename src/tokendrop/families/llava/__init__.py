"""The LLaVA lineage: LLaVA-1.5 (`llava.py`), LLaVA-NeXT (`llava_next.py`) and LLaVA-OneVision
(`llava_onevision.py`), with what they share (`common.py`: the declaration base; `vision.py`: one pass
of the CLIP / SigLIP tower that reads features and score rows), their tiny random builders
(`tiny.py`) and the vLLM model classes that serve all three (`vllm.py`, imported only
by vLLM's plugin loader).
"""
