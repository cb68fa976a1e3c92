"""The Qwen-VL lineage: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (dense and MoE) (one module each), with
what they share (`common.py`: native-resolution grid, 2x2 merger, M-RoPE position patches, received-attention scores),
their tiny random builders (`tiny.py`) and the vLLM model class that serves Qwen2.5-VL (`vllm.py`,
imported only by vLLM's plugin loader).
"""
