"""`opensora workflow run FILE.json`: run a workflow of this pack's nodes without ComfyUI.

    opensora workflow run workflows/opensora_text_to_video.json \
        --set "Open-Sora Text Encode.prompt=a lighthouse at dusk" --set 6.seed=7 --output-dir out/

FILE is an editor workflow (what ComfyUI saves and what the files in workflows/ are) or an
API prompt (`{"id": {"class_type", "inputs"}}`). Editor workflows are converted with the
editor's rules: widget values are positional in the node's input order, a seed is followed
by its "control after generate" value, an upload combo by its button value; links win over
widgets; Reroute, Note and MarkdownNote nodes, muted (mode 2) and bypassed (mode 4) nodes
are handled as in the editor. Subgraphs are not supported.

`--set NODE.INPUT=VALUE` overrides an input; NODE is a node id or its title (the editor's
title, or the display name of its type), VALUE is JSON when it parses as JSON, else a string.
The nodes are validated as ComfyUI does (required inputs, combo options, min/max, the nodes'
VALIDATE_INPUTS, whose message ComfyUI attaches to every input it declares) before anything
runs; the output nodes and what they need are executed once each, in dependency order. As in
ComfyUI, every output is a list: a node whose inputs come from a list output (OUTPUT_IS_LIST,
e.g. the decoders with a batch) runs once per item, shorter lists repeating their last item.
Core nodes used by the shipped workflows (LoadImage, LoadVideo, GetVideoComponents,
CreateVideo, SaveVideo, SaveImage, PreviewImage, SaveAnimatedWEBP) have headless stand-ins
(`headless_core`). Saved files are embedded with the workflow, like ComfyUI's own.

Exit status: 0 ok, 1 a node failed, 2 invalid workflow or input, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import comfy_host as host

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


class WorkflowError(Exception):
    """A workflow that cannot run: bad file, unknown node, invalid input (exit 2)."""


class NodeFailed(Exception):
    """A node raised while running (exit 1)."""


def node_classes() -> dict:
    from . import NODE_CLASS_MAPPINGS
    from .headless_core import CORE_NODES

    return {**CORE_NODES, **NODE_CLASS_MAPPINGS}


def display_names() -> dict:
    from . import NODE_DISPLAY_NAME_MAPPINGS

    return dict(NODE_DISPLAY_NAME_MAPPINGS)


def _spec(spec) -> tuple:
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return typ, opts


def _input_specs(cls) -> dict:
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def _is_widget(spec) -> bool:
    typ, opts = _spec(spec)
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")


# --------------------------------------------------------------------------------------------
# Editor format -> API prompt
# --------------------------------------------------------------------------------------------


def is_editor_workflow(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def editor_to_api(workflow: dict, classes: dict, strict: bool = False) -> dict:
    """The API prompt of an editor workflow (see the module docstring for the rules).

    strict: raise when a node's widget values do not match its widgets one for one (a
    workflow saved against other node definitions)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("workflow uses subgraphs, which the headless runner does not support; unpack them")
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow["links"]:
        link_id, origin, slot = (link[0], link[1], link[2]) if isinstance(link, list) else (
            link["id"], link["origin_id"], link["origin_slot"])
        links[link_id] = (str(origin), int(slot))

    def source(link_id, want_type=None, seen=()):
        """(node id, slot) a link finally comes from, through reroutes and bypassed nodes."""
        if link_id is None or link_id not in links:
            return None
        origin, slot = links[link_id]
        node = nodes.get(origin)
        if node is None or origin in seen:
            return None
        if node["type"] == "Reroute" or node.get("mode") == 4:
            for inp in node.get("inputs", []):
                if node["type"] == "Reroute" or want_type in (None, inp.get("type")):
                    return source(inp.get("link"), want_type, seen + (origin,))
            return None
        if node.get("mode") == 2:
            return None
        return origin, slot

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in VIRTUAL_TYPES or node.get("mode") in (2, 4):
            continue
        if kind not in classes:
            raise WorkflowError(
                f"node #{node_id} has type {kind!r}, which is not available headless; known types: {sorted(classes)}"
            )
        inputs = _widget_inputs(node_id, kind, _input_specs(classes[kind]), node.get("widgets_values") or [], strict)
        for inp in node.get("inputs", []):
            src = source(inp.get("link"), inp.get("type"))
            if src is not None:
                origin = nodes[src[0]]
                if origin["type"] == "PrimitiveNode":
                    inputs[inp["name"]] = (origin.get("widgets_values") or [None])[0]
                else:
                    inputs[inp["name"]] = [src[0], src[1]]
        prompt[node_id] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title") or kind}}
    return prompt


def _widget_inputs(node_id: str, kind: str, specs: dict, values, strict: bool = False) -> dict:
    if isinstance(values, dict):  # some frontends save widgets by name
        return {k: v for k, v in values.items() if k in specs}
    values, inputs, i = list(values), {}, 0
    for name, spec in specs.items():
        if not _is_widget(spec):
            continue
        if i >= len(values):
            break
        inputs[name] = values[i]
        i += 1
        typ, opts = _spec(spec)
        control = opts.get("control_after_generate") or (typ == "INT" and name in ("seed", "noise_seed"))
        if control and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
        if any(opts.get(flag) for flag in UPLOAD_FLAGS) and i < len(values) and isinstance(values[i], str):
            i += 1
    widgets = [name for name, spec in specs.items() if _is_widget(spec)]
    if strict and (i != len(values) or len(inputs) != len(widgets)):
        raise WorkflowError(
            f"node #{node_id} {kind}: {len(values)} widget values do not match its widgets {widgets} (used {i})"
        )
    return inputs


# --------------------------------------------------------------------------------------------
# Overrides and validation
# --------------------------------------------------------------------------------------------


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(prompt: dict, sets: list[str], names: dict | None = None) -> None:
    """Apply "NODE.INPUT=VALUE" overrides (NODE = id or title) in place."""
    names = names or {}
    for item in sets:
        target, eq, value = item.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not eq or not dot or not node_ref or not name:
            raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE (NODE = node id or title)")
        if node_ref in prompt:
            matches = [node_ref]
        else:
            matches = [nid for nid, n in prompt.items()
                       if node_ref in (n.get("_meta", {}).get("title"), names.get(n["class_type"]))]
        if len(matches) != 1:
            titles = sorted({n.get("_meta", {}).get("title", n["class_type"]) for n in prompt.values()})
            what = "no node" if not matches else f"{len(matches)} nodes ({matches}); use the id"
            raise WorkflowError(f"--set {item!r}: {what} matches {node_ref!r}; ids: {sorted(prompt)}, titles: {titles}")
        prompt[matches[0]]["inputs"][name] = _parse_value(value)


def _check_value(spec, value) -> str | None:
    """What is wrong with a widget value (None if nothing)."""
    typ, opts = _spec(spec)
    options = typ if isinstance(typ, list) else opts.get("options") if typ == "COMBO" else None
    if options and value not in options:
        return f"{value!r} is not one of {options}"
    if typ in ("INT", "FLOAT"):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (typ == "INT" and isinstance(value, float)):
            return f"{value!r} is not {'an integer' if typ == 'INT' else 'a number'}"
        if "min" in opts and value < opts["min"]:
            return f"{value} is smaller than the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{value} is bigger than the maximum {opts['max']}"
    if typ == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a string"
    if typ == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not true or false"
    return None


def validate(prompt: dict, classes: dict) -> list[str]:
    """ComfyUI's checks: known types, links, required inputs, combos, min/max, VALIDATE_INPUTS.
    As ComfyUI does, a VALIDATE_INPUTS message counts once for every input it declares that
    the node has ("node #5 X: input 'width': message")."""
    import inspect

    errors = []
    for node_id, node in prompt.items():
        kind = node.get("class_type")
        where = f"node #{node_id} {kind}"
        if kind not in classes:
            errors.append(f"{where}: node type {kind!r} is not available headless")
            continue
        cls, inputs = classes[kind], node.get("inputs", {})
        types = cls.INPUT_TYPES()
        validator = getattr(cls, "VALIDATE_INPUTS", None)
        declared = set(inspect.getfullargspec(validator).args) if validator else set()
        known = {**types.get("required", {}), **types.get("optional", {})}
        for name in inputs:  # e.g. a --set with a misspelt input name
            if name not in known and name not in types.get("hidden", {}):
                errors.append(f"{where}: it has no input {name!r}; its inputs: {sorted(known)}")
        for name, spec in {**types.get("required", {}), **types.get("optional", {})}.items():
            required = name in types.get("required", {})
            if name not in inputs:
                if required:
                    errors.append(f"{where}: required input {name!r} is missing")
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2 or str(value[0]) not in prompt:
                    errors.append(f"{where}: input {name!r} is linked to node {value[0]!r}, which is not there")
                continue
            if name in declared:
                continue
            problem = _check_value(spec, value)
            if problem:
                errors.append(f"{where}: input {name!r}: {problem}")
        if validator:
            args = {a: (None if isinstance(inputs.get(a), list) else inputs.get(a)) for a in declared if a != "cls"}
            verdict = validator(**args)
            if verdict is not True:
                errors += [f"{where}: input {a!r}: {verdict}" for a in declared if a in inputs]
    return errors


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------


def execute(prompt: dict, classes: dict, extra_pnginfo: dict | None = None, log=None) -> dict:
    """Run the output nodes and their inputs once each; {node id: ui dict} of the output nodes.
    Outputs are lists, mapped over as ComfyUI does (see the module docstring)."""
    results, ui = {}, {}
    log = log or (lambda message: None)

    def run(node_id: str, stack: tuple = ()) -> tuple[list, ...]:
        if node_id in results:
            return results[node_id]
        if node_id in stack:
            raise WorkflowError(f"node #{node_id} is part of a cycle: {' -> '.join(stack + (node_id,))}")
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        inputs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                inputs[name] = run(str(value[0]), stack + (node_id,))[value[1]]
            else:
                inputs[name] = [value]
        hidden = cls.INPUT_TYPES().get("hidden", {})
        for name, kind in hidden.items():
            kind = kind[0] if isinstance(kind, (list, tuple)) else kind
            inputs[name] = [{"PROMPT": prompt, "EXTRA_PNGINFO": extra_pnginfo or {}, "UNIQUE_ID": node_id}.get(kind)]
        if getattr(cls, "INPUT_IS_LIST", False):
            calls = [inputs]
        elif any(len(v) == 0 for v in inputs.values()):
            calls = []
        else:
            count = max((len(v) for v in inputs.values()), default=1)
            calls = [{k: v[min(i, len(v) - 1)] for k, v in inputs.items()} for i in range(count)]
        returns = getattr(cls, "RETURN_TYPES", ())
        is_list = tuple(getattr(cls, "OUTPUT_IS_LIST", ())) + (False,) * len(returns)
        outputs: tuple[list, ...] = tuple([] for _ in returns)
        for i, kwargs in enumerate(calls):
            log(f"node #{node_id} {node['class_type']}" + (f" ({i + 1}/{len(calls)})" if len(calls) > 1 else ""))
            try:
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
            except (host.InterruptedByUser, KeyboardInterrupt):
                raise
            except Exception as err:
                raise NodeFailed(f"node #{node_id} {node['class_type']}: {type(err).__name__}: {err}") from err
            if isinstance(out, dict):
                for key, values in (out.get("ui") or {}).items():
                    ui.setdefault(node_id, {}).setdefault(key, []).extend(values)
                out = out.get("result", ())
            for slot, value in enumerate(tuple(out)[: len(returns)]):
                if is_list[slot]:
                    outputs[slot].extend(value)
                else:
                    outputs[slot].append(value)
        results[node_id] = outputs
        return outputs

    outputs = [nid for nid, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("workflow has no output node (a Save / Preview node); nothing would run")
    for node_id in outputs:
        run(node_id)
    return ui


def run_workflow(data: dict, sets: list[str] = (), log=None) -> tuple[dict, list[Path]]:
    """Convert, override, validate and run a workflow; (ui per output node, saved files)."""
    classes = node_classes()
    editor = is_editor_workflow(data)
    if editor:
        prompt = editor_to_api(data, classes)
    elif isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        prompt = json.loads(json.dumps(data))
    else:
        raise WorkflowError("not a workflow: expected an editor workflow (nodes, links) or an API prompt")
    apply_overrides(prompt, list(sets), display_names())
    errors = validate(prompt, classes)
    if errors:
        raise WorkflowError("invalid workflow:\n  " + "\n  ".join(errors))
    ui = execute(prompt, classes, {"workflow": data} if editor else {}, log)
    out = host.output_directory()
    files = [out / e.get("subfolder", "") / e["filename"] for u in ui.values() for e in u.get("images", [])]
    return ui, files


def cmd_workflow_run(args) -> int:
    """The `opensora workflow run` command (arguments from opensora_sdk.cli)."""
    host.configure(models_dir=args.models_dir, output_dir=args.output_dir,
                   input_dir=args.input_dir or Path(args.file).resolve().parent / "inputs")
    try:
        data = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        print(f"opensora workflow run: error: cannot read {args.file!r}: {err}", file=sys.stderr)
        return EXIT_INVALID
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr))
    steps = None
    if not args.quiet and sys.stderr.isatty():
        steps = host.add_progress_listener(
            lambda value, total, preview: print(f"\r  {host.progress_label()} {value}/{total}",
                                                end="\n" if value == total else "", file=sys.stderr, flush=True))
    try:
        _, files = run_workflow(data, args.set or [], log)
    except WorkflowError as err:
        print(f"opensora workflow run: error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except NodeFailed as err:
        print(f"opensora workflow run: failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except host.InterruptedByUser as err:
        print(f"opensora workflow run: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if steps is not None:
            host.remove_progress_listener(steps)
    for path in files:
        print(path)
    return EXIT_OK
