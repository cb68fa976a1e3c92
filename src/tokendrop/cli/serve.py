"""`tokendrop serve`: vLLM's OpenAI-compatible server with a tokendrop method (tokendrop.vllm).

    tokendrop serve --method hired --budget 0.2                      # the bundled model
    tokendrop serve --model llava-hf/llava-v1.6-vicuna-7b-hf --method hired --budget 0.2 --port 8001

Every option tokendrop does not know goes to vLLM unchanged (`--port`, `--max-model-len`, ...).
Settings are checked against the model's config before vLLM starts: a bad one is a one-line
error and exit code 2.
"""

from __future__ import annotations

import importlib.util
import os
import shlex

from tokendrop.cli import UsageError
from tokendrop.cli.options import add_method_options, flag, method_configs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model with vLLM's OpenAI-compatible server and a pre-LLM method",
                              description="Start vLLM's OpenAI-compatible server (python -m "
                                          "vllm.entrypoints.openai.api_server) with a tokendrop pre-LLM method. "
                                          "Options tokendrop does not know are passed to vLLM.")
    p.add_argument("--model", default=None, help="a checkpoint folder or hub id (default: the bundled model)")
    add_method_options(p, default="hired", budget="0.2")
    p.add_argument("--print-command", action="store_true", help="print the server command and exit")
    keep_unknown_for_vllm(p)


def keep_unknown_for_vllm(parser) -> None:
    """Collect the options this parser does not know in `vllm_args` instead of failing on them.

    The dispatcher parses with `parse_args`, which refuses unknown options; the subparser's own
    `parse_known_args` (an instance attribute of this one parser) hands them over as a value.
    """
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, unknown = parse_known(args, namespace)
        namespace.vllm_args = unknown
        return namespace, []

    parser.parse_known_args = parse_known_args


def run(args) -> int:
    from tokendrop.registry import build_methods

    names, budgets, options = method_configs(args)
    if len(names) != 1 or len(budgets) != 1:
        raise UsageError(f"--method and --budget take one value each for a server, got {args.method!r} and {args.budget!r}")
    with flag("--method"):
        methods = build_methods(names[0], budget=budgets[0], **options)
        if len(methods) > 1:
            raise ValueError(f"{names[0]!r} composes two methods; a server runs one pre-LLM method")
    model = args.model or bundled_model()
    with flag("--model" if args.model else "--method"):
        command = server_command(model, methods[0] if methods else None, args.vllm_args)
    if args.print_command:
        print(shlex.join(command))
        return 0
    if not vllm_installed():
        raise UsageError("serving needs vLLM: pip install 'tokendrop[vllm]' (CPU machines: README, 'Serving with vLLM')")
    os.execv(command[0], command)  # the server replaces this process: signals and exit code are its own


def vllm_installed() -> bool:
    try:  # a submodule: a folder named vllm on sys.path would pass as a namespace package
        return importlib.util.find_spec("vllm.entrypoints") is not None
    except ModuleNotFoundError:
        return False


def server_command(model, method, vllm_args):
    from tokendrop.vllm.server import server_command as build

    return build(model, method, vllm_args)


def bundled_model() -> str:
    from tokendrop.loading import bundled_model_path

    path = bundled_model_path()
    if path is None:
        raise UsageError("--model is required: this install has no bundled model")
    return str(path)
