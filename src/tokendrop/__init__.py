"""tokendrop: training-free visual token dropping for stock Hugging Face vision-language models.

    import tokendrop as td
    handle = td.apply(model, processor, td.HiRED(budget=0.2, alpha=0.5))
    out = model.generate(**processor(images=img, text=prompt, return_tensors="pt"), max_new_tokens=32)
    handle.remove()
"""

__version__ = "0.1.0"
