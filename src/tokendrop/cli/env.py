"""`tokendrop env`: versions and machine facts for bug reports."""

from __future__ import annotations

import json
import platform


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="print versions and machine facts for bug reports")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def collect() -> dict:
    import torch
    import transformers

    import tokendrop

    return {
        "tokendrop": tokendrop.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:13s} {value}")
    return 0
