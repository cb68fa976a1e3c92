"""What runs a stock model with a method, whatever its family: the in-LLM decoder loop (`decoder.py`)."""
