"""`tokendrop methods`: every method, its options with their defaults, and the model families it runs on;
the controls families declare (their own setting for fewer visual tokens, run by bench and eval).

    tokendrop methods            # a table per method
    tokendrop methods --json -   # the same for scripts
"""

from __future__ import annotations

import dataclasses
import json

from tokendrop.cli.options import add_json, output_path, write_output


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list the methods, their options (--method-args) and the families they run on")
    add_json(p, "the listing")


def listing() -> dict:
    """{"methods": [...], "controls": [...], "families": [...]} from the registries."""
    from tokendrop.families.base import CAPABILITIES
    from tokendrop.registry import PRESETS, control_class, control_names, families, method_class, method_names, runs_on

    methods = []
    for name in method_names():
        cls = method_class(name)
        preset = PRESETS.get(name, (name, {}))[1]
        options = {f.name: preset.get(f.name, None if f.default is dataclasses.MISSING else f.default)
                   for f in cls.options().values()}
        entry = {"name": name, "class": cls.__name__, "stage": "before the LLM" if cls.stage == "pre" else "inside the LLM",
                 "summary": (cls.__doc__ or "").strip().splitlines()[0], "options": options,
                 "required": [f for f, field in cls.options().items() if field.default is dataclasses.MISSING],
                 "families": runs_on(cls)}
        if name in PRESETS:
            entry["preset"] = {"of": PRESETS[name][0], **PRESETS[name][1]}
        methods.append(entry)
    listed = [{"name": f.name, "models": list(f.model_classes),
               "capabilities": {c: CAPABILITIES[c] for c in sorted(f.family_capabilities())}} for f in families()]
    controls = [{"name": name, "family": family, "summary": (control_class(name).__doc__ or "").strip().splitlines()[0]}
                for name, family in control_names().items()]
    return {"methods": methods, "controls": controls, "families": listed}


def run(args) -> int:
    out = output_path(args.json, "--json")
    data = listing()
    if args.json is not None:
        text = json.dumps(data, indent=2, default=repr)
        print(text) if out is None else write_output(out, text + "\n", "--json")
        return 0
    for m in data["methods"]:
        preset = f" (preset of {m['preset']['of']})" if "preset" in m else ""
        print(f"{m['name']}{preset}: {m['class']}, {m['stage']}. {m['summary']}")
        opts = ", ".join(f"{k}={v!r}" if k not in m["required"] else f"{k} (required)" for k, v in m["options"].items())
        print(f"    options: {opts}")
        print(f"    runs on: {', '.join(m['families']) or '-'}")
    if data["controls"]:
        print("\ncontrols (bench and eval run them beside the methods at each --budget; nothing is dropped):")
    for c in data["controls"]:
        print(f"  {c['name']}: {c['family']} only. {c['summary']}")
    print("\nfamilies:")
    for f in data["families"]:
        print(f"  {f['name']}: {', '.join(f['models'])}; {', '.join(f['capabilities'])}")
    print("\nPass options as --method-args key=value,... (e.g. --method hired --method-args alpha=0.6,variant=official).")
    return 0
