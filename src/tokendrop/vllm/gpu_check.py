"""`scripts/gpu-check`: on one CUDA GPU, does tokendrop's vLLM plugin give the transformers path's prompt
lengths and first-token logprobs, under vLLM's Model Runner V2 and V1? Then a short serve-bench.

For a person with one CUDA GPU after `pip install "tokendrop[vllm]"` (the real vllm 0.32 wheel); nothing
is downloaded. Models (`MODELS`), saved to a temporary folder in the layout stock vLLM loads:
  bundled      the bundled trained LLaVA-NeXT,
  llava-next   a tiny random LLaVA-NeXT (`tokendrop.tiny`),
  qwen2.5-vl   a tiny random Qwen2.5-VL (its LLM heads widened to 32: attention kernels want >= 32).
Per model and runner, one child process (the runner is read from the environment when vLLM starts)
runs one vLLM engine per configuration of `CHECKS` (stock and tokendrop methods) in turn, generating
one token with logprobs for each image of `IMAGE_SIZES`. Runners: "v2" sets VLLM_USE_V2_MODEL_RUNNER=1
(the GPU default, set so that a silent fall-back to V1 cannot pass as V2: the engine reports the
runner it used), "v1" sets it to 0. The transformers path (`td.apply`) runs the same model, prompt
and images on the same device. A row passes when every prompt length equals the transformers one
and the largest |vLLM - transformers| logprob over vLLM's 5 likeliest first tokens, over the images,
is below the tolerance. One table, then `tokendrop serve-bench` on the bundled model (stock vs HiRED,
concurrency 1 and 8). Exit code 0 when every row passes, 1 otherwise, 2 for a usage error.

Without CUDA it refuses in one line, unless `--device cpu` (the CPU vLLM engine: V1 only, as the
serving tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MODELS = ("bundled", "llava-next", "qwen2.5-vl")
#: model -> configurations checked on it ("none": stock vLLM; METHOD@BUDGET as serve-bench's --configs)
CHECKS = {"bundled": ("none", "hired@0.2", "spatial@0.2"), "llava-next": ("hired@0.3", "dominant@0.3"),
          "qwen2.5-vl": ("none", "dominant@0.3", "spatial@0.3")}
RUNNERS = {"v2": "1", "v1": "0"}  #: runner -> VLLM_USE_V2_MODEL_RUNNER
IMAGE_SIZES = [(200, 300), (300, 130)]  #: (height, width): a wide and a tall image (different grids)
QUESTION = "What is shown in this image?"
#: fp32 on both sides: kernels sum in other orders (1e-6 on CPU, more with GPU kernels); a different
#: kept token or count moves a logprob by far more
DEFAULT_TOLERANCE = 1e-3
BENCH = ["--configs", "none,hired@0.2", "--concurrency", "1,8", "--requests", "8", "--max-tokens", "16"]


class UsageError(ValueError):
    """A bad argument: one line, exit code 2."""


@dataclass
class Job:
    """One child process: every configuration of one model under one runner."""

    model: str
    folder: str
    runner: str
    configs: list[tuple[str, dict | None]]  # (label, hf_overrides or None for stock)
    prompt: str
    images: list[str]  # PNG paths
    engine: dict = field(default_factory=dict)  # vLLM engine options
    device: str = "cuda"


# ---- arguments -------------------------------------------------------------------------------------
def parse_args(argv=None, cuda_available=None) -> argparse.Namespace:
    """The parsed arguments, checked; UsageError naming the flag and what is allowed."""
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the CPU vLLM engine (V1 only) (default: %(default)s)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of %(default)s")
    p.add_argument("--runners", default=None, help="comma list of v2, v1 (default: both on cuda, v1 on cpu)")
    p.add_argument("--tolerance", default=str(DEFAULT_TOLERANCE), help="largest |dlogprob| a row passes with (default: %(default)s)")
    p.add_argument("--no-bench", action="store_true", help="skip the short serve-bench")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise UsageError(f"--device must be cuda or cpu, got {args.device!r}")
    args.models = choices(args.models, MODELS, "--models")
    default_runners = "v2,v1" if args.device == "cuda" else "v1"
    args.runners = choices(args.runners or default_runners, tuple(RUNNERS), "--runners")
    if args.device == "cpu" and "v2" in args.runners:
        raise UsageError("--runners v2 needs --device cuda: Model Runner V2 needs Triton, which the CPU engine lacks")
    try:
        args.tolerance = float(args.tolerance)
    except ValueError:
        raise UsageError(f"--tolerance must be a positive number, got {args.tolerance!r}") from None
    if not args.tolerance > 0:
        raise UsageError(f"--tolerance must be a positive number, got {args.tolerance!r}")
    cuda = cuda_available if cuda_available is not None else has_cuda()
    if args.device == "cuda" and not cuda:
        raise UsageError("no CUDA GPU here (torch.cuda.is_available() is False): gpu-check checks the vLLM plugin on a "
                         "GPU; --device cpu runs the same comparison on the CPU vLLM engine (V1 only)")
    return args


def choices(text: str, allowed: tuple, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        raise UsageError(f"{flag} takes a comma list of {', '.join(allowed)}, got {text!r}")
    return items


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- models ------------------------------------------------------------------------------------------
def build_model(name: str):
    """(model, processor) of one of `MODELS`, fp32 on the CPU (random weights but the bundled model's)."""
    if name == "bundled":
        from tokendrop.loading import bundled_model_path, load_model

        path = bundled_model_path()
        if path is None:
            raise UsageError("--models bundled: this install has no bundled model (tokendrop/assets/model)")
        return load_model(str(path), device="cpu")
    if name == "llava-next":
        from tokendrop.tiny import tiny_llava_next

        return tiny_llava_next(text_layers=4)
    return tiny_qwen2_5_vl_32()


def tiny_qwen2_5_vl_32():
    """The tiny Qwen2.5-VL with 2 LLM heads of 32 (the builder's are 16 wide: too narrow for vLLM's
    attention kernels), M-RoPE sections summing to 16, weights drawn again."""
    import torch

    from tokendrop.tiny import tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(text_layers=4)
    text = model.config.text_config
    text.num_attention_heads, text.num_key_value_heads = 2, 1
    if getattr(text, "head_dim", None) is not None:
        text.head_dim = 32
    text.rope_parameters["mrope_section"] = [4, 6, 6]
    torch.manual_seed(0)
    return type(model)(model.config).eval(), processor


def save_model(model, processor, folder: Path) -> dict:
    """Save for vLLM; the engine options this model needs (the video stub's remote code, no videos)."""
    from tokendrop.loading import save_hub_layout
    from tokendrop.vllm import serve_bench

    save_hub_layout(model, processor, folder)
    if not serve_bench.add_video_processor(folder, model.config.model_type):
        return {}
    return {"trust_remote_code": "--trust-remote-code" in serve_bench.vllm_args_for(folder),
            "limit_mm_per_prompt": {"image": 1, "video": 0}}


def images(folder: Path) -> list[str]:
    """The check's images, saved as PNG (lossless: both paths read the same pixels)."""
    from tokendrop.bench import test_image

    paths = []
    for index, (height, width) in enumerate(IMAGE_SIZES):
        path = folder / f"image-{index}.png"
        test_image(height, width, seed=index).save(path)
        paths.append(str(path))
    return paths


def method_of(label: str):
    """None for "none", else the method of METHOD@BUDGET."""
    from tokendrop.registry import build_methods

    name, _, budget = label.partition("@")
    methods = build_methods(name, budget=float(budget) if budget else None)
    return methods[0] if methods else None


# ---- the two paths --------------------------------------------------------------------------------
def transformers_path(model, processor, method, prompt: str, image_paths: list[str], device: str):
    """[(prompt length, {token id: first-token logprob} over the whole vocabulary as a tensor)] from
    tokendrop's transformers path (`td.apply`) on `device`."""
    import torch
    from PIL import Image

    import tokendrop as td

    model.to(device)
    out = []
    with td.apply(model, processor, *([method] if method is not None else [])), torch.no_grad():
        for path in image_paths:
            inputs = processor(images=Image.open(path).convert("RGB"), text=prompt, return_tensors="pt").to(device)
            logits = model(**inputs).logits[0, -1].float()
            out.append((inputs["input_ids"].shape[1], logits.log_softmax(dim=-1).cpu()))
    return out


def compare(ours: list, reference: list) -> tuple[bool, float]:
    """(every prompt length equal, max |dlogprob| over vLLM's listed tokens and the images)."""
    lengths_equal = [n for n, _ in ours] == [n for n, _ in reference]
    diff = max(abs(value - logprobs[int(token)].item()) for (_, top), (_, logprobs) in zip(ours, reference)
               for token, value in top.items())
    return lengths_equal, diff


def run_engine(job: Job, log_path: Path) -> dict:
    """The job in a child process (`engine_main`): {"runner": the runner vLLM used, "results": label ->
    [(prompt length, {token: logprob})] or an error line}; RuntimeError with the log's last line when
    the process itself fails."""
    spec, out = log_path.with_suffix(".job.json"), log_path.with_suffix(".out.json")
    spec.write_text(json.dumps(job.__dict__))
    env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": RUNNERS[job.runner]}
    if job.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    code = "import sys; from tokendrop.vllm.gpu_check import engine_main; engine_main(sys.argv[1], sys.argv[2])"
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-c", code, str(spec), str(out)], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the vLLM process failed (exit code {done.returncode}): {last_line(log_path)} (log: {log_path})")
    return json.loads(out.read_text())


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def engine_main(spec_path: str, out_path: str) -> None:
    """Child process: every configuration of the job in its own vLLM engine, one after another."""
    import gc

    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.loads(Path(spec_path).read_text())
    requests = [{"prompt": job["prompt"], "multi_modal_data": {"image": Image.open(p).convert("RGB")}}
                for p in job["images"]]
    params = SamplingParams(max_tokens=1, logprobs=5, temperature=0)
    results, runner = {}, None
    for label, hf_overrides in job["configs"]:
        try:
            llm = LLM(model=job["folder"], hf_overrides=hf_overrides or {}, **job["engine"])
        except Exception as err:  # noqa: BLE001 (reported in the row; the next configuration still runs)
            results[label] = f"{type(err).__name__}: {first_line(err)}"
            continue
        try:
            runner = "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
            outputs = llm.generate(requests, params, use_tqdm=False)
            results[label] = [(len(o.prompt_token_ids), {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()})
                              for o in outputs]
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    Path(out_path).write_text(json.dumps({"runner": runner, "results": results}))


def first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


# ---- the check -------------------------------------------------------------------------------------
def check(models: dict[str, tuple], runners: list[str], device: str, tolerance: float, work: Path,
          engine=run_engine, progress=print) -> list[dict]:
    """One row per model x runner x configuration: {"model", "runner", "config", "lengths",
    "reference_lengths", "max_dlogprob", "pass", "error"}. `engine(job, log_path)` runs vLLM
    (`run_engine`; tests pass a stand-in)."""
    from tokendrop.loading import format_prompt
    from tokendrop.vllm import overrides

    rows = []
    for name, labels in models.items():
        folder = work / name
        model, processor = build_model(name)
        engine_options = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "seed": 0,
                          "gpu_memory_utilization": 0.3, "limit_mm_per_prompt": {"image": 1},
                          **save_model(model, processor, folder)}
        prompt, paths = format_prompt(processor, QUESTION), images(folder)
        methods = {label: method_of(label) for label in labels}
        configs = [(label, overrides(m).as_dict(str(folder)) if m else None) for label, m in methods.items()]
        reference = {label: transformers_path(model, processor, m, prompt, paths, device) for label, m in methods.items()}
        for runner in runners:
            job = Job(name, str(folder), runner, configs, prompt, paths, engine_options, device)
            start = time.monotonic()
            try:
                answer = engine(job, work / f"{name}-{runner}.log")
            except RuntimeError as err:
                answer = {"runner": None, "results": {label: str(err) for label in labels}}
            for label in labels:
                rows.append(row(name, runner, label, answer, reference[label], tolerance))
                progress(format_row(rows[-1]))
            progress(f"  ({name}, {runner}: {time.monotonic() - start:.0f} s)")
    return rows


def row(model: str, runner: str, label: str, answer: dict, reference: list, tolerance: float) -> dict:
    """One configuration's verdict from the engine's answer and the transformers reference."""
    result = {"model": model, "runner": runner, "config": label, "lengths": None,
              "reference_lengths": [n for n, _ in reference], "max_dlogprob": None, "pass": False, "error": None}
    ours = answer["results"].get(label, "no result")
    if isinstance(ours, str):
        return {**result, "error": ours}
    lengths_equal, diff = compare(ours, reference)
    result.update(lengths=[n for n, _ in ours], max_dlogprob=diff)
    if answer["runner"] != runner:
        return {**result, "error": f"vLLM ran Model Runner {answer['runner']}, not {runner}"}
    if not lengths_equal:
        return {**result, "error": "prompt lengths differ"}
    return {**result, "pass": diff < tolerance, "error": None if diff < tolerance else f"|dlogprob| >= {tolerance:g}"}


HEADER = f"{'model':<12}{'runner':<8}{'config':<14}{'prompt lengths (vLLM / transformers)':<40}{'max |dlogprob|':>15}  result"


def format_row(r: dict) -> str:
    lengths = f"{r['lengths'] or '-'} / {r['reference_lengths']}"
    diff = "-" if r["max_dlogprob"] is None else f"{r['max_dlogprob']:.1e}"
    verdict = "pass" if r["pass"] else f"FAIL: {r['error']}"
    return f"{r['model']:<12}{r['runner']:<8}{r['config']:<14}{lengths:<40}{diff:>15}  {verdict}"


def format_table(rows: list[dict]) -> str:
    passed = sum(r["pass"] for r in rows)
    return "\n".join([HEADER, *(format_row(r) for r in rows), f"{passed} of {len(rows)} rows pass"])


def serve_bench(device: str, work: Path) -> int:
    """The short serve-bench on the bundled model (its own process: `tokendrop serve-bench`)."""
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU engine's default is sized for big servers
    command = [sys.executable, "-m", "tokendrop", "serve-bench", "--model", "bundled", *BENCH,
               "--log-dir", str(work / "serve-bench"), "--gpu-memory-utilization", "0.3"]
    return subprocess.run(command, env=env).returncode


def main(argv=None) -> int:
    """`scripts/gpu-check`: see the module docstring."""
    from tokendrop.cli.serve import vllm_installed

    start = time.monotonic()
    try:
        args = parse_args(argv)
        if not vllm_installed():
            raise UsageError("vLLM is not installed: pip install 'tokendrop[vllm]'")
    except UsageError as err:
        print(f"gpu-check: error: {err}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tokendrop-gpu-check-"))
    print(f"gpu-check on {args.device}: models {', '.join(args.models)}; runners {', '.join(args.runners)}; "
          f"tolerance {args.tolerance:g}; work folder {work}")
    print(HEADER)
    rows = check({m: CHECKS[m] for m in args.models}, args.runners, args.device, args.tolerance, work)
    print("\n" + format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bench = 0 if args.no_bench else serve_bench(args.device, work)
    print(f"gpu-check took {time.monotonic() - start:.0f} s")
    return 0 if all(r["pass"] for r in rows) and bench == 0 else 1


if __name__ == "__main__":  # `python -m tokendrop.vllm.gpu_check`: the same as scripts/gpu-check, from a wheel
    sys.exit(main())
