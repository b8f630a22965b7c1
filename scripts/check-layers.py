#!/usr/bin/env python3
"""Checks that each crate's top-level modules only import downwards.

Two crates: the library (`src/`, LAYERS) and the tools (`tools/src/`, TOOLS_LAYERS), which
sits above the whole library and can reach it only through its public API (`rebindgw::`; the
compiler enforces that). For each crate it reads every `.rs` file (comments stripped),
collects the `crate::X` paths of each top-level module (`X.rs` or `X/`), and fails (exit 1) when
  - a module imports a module of a higher layer of LAYERS (an upward import),
  - a module imports another module of its own layer where LAYERS does not allow it,
  - modules import each other in a cycle (possible within one layer),
  - a module is missing from LAYERS, or LAYERS names a module that does not exist,
  - the sibling files of one folder module import each other in a cycle
    (e.g. `loadgen/report.rs` <-> `loadgen/shard.rs`; `mod.rs` is not a sibling).

Test modules count too: a test that needs a higher layer belongs in that layer or in tests/.
`lib.rs` and `main.rs` are the roots and may use everything.

Usage: scripts/check-layers.py [--graph] [REPO_ROOT]   (tests/layers.rs runs it under `cargo test`)
"""

import os
import re
import sys

# Bottom first: (name, modules, whether they may import each other). A module may import the
# modules of the layers below it and, in a layer marked True, the other modules of its layer
# (as long as that makes no cycle). Keep in sync with the diagram in docs/architecture.md.
LAYERS = [
    ("base", ["time", "logging", "replay"], False),
    ("primitives", ["crypto"], False),
    ("wire and trial decryption", ["wire", "engine"], False),
    ("keys and host link", ["keys", "rebind", "hostlink"], False),
    ("protocol state", ["registry", "verify"], True),
    ("tables", ["table"], False),
    ("os", ["io", "secrets", "cluster"], True),
    ("endpoints", ["gateway", "host", "client"], False),
    ("applications", ["tunnel"], False),
    ("test harness", ["sim"], False),
]

# The tools crate (tools/src), above every layer of the library.
TOOLS_LAYERS = [
    ("tools", ["loadgen", "conformance", "bench", "demo"], True),
]

ROOTS = {"lib", "main"}

PATH_RE = re.compile(r"\bcrate::(\{|[a-z_][a-z0-9_]*)")
# The tools crate's paths into the library (shown by --graph, checked by the compiler).
LIB_PATH_RE = re.compile(r"\brebindgw::(\{|[a-z_][a-z0-9_]*)")
SUPER_RE = re.compile(r"\bsuper::([a-z_][a-z0-9_]*)")


def strip_comments(text):
    """Drops `//` and `/* */` comments, keeping string literals (and line numbers)."""
    out = []
    i, n = 0, len(text)
    depth = 0
    while i < n:
        c = text[i]
        if depth:
            if text.startswith("*/", i):
                depth -= 1
                i += 2
            elif text.startswith("/*", i):
                depth += 1
                i += 2
            else:
                if c == "\n":
                    out.append(c)
                i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth = 1
            i += 2
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "'" and i + 2 < n and (text[i + 2] == "'" or text[i + 1] == "\\"):
            # A char literal such as '"' or '\n' (lifetimes have no closing quote).
            j = text.find("'", i + 2)
            out.append(text[i : j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def group_heads(text, start):
    """The first segment of each item of a `{ ... }` group opening at `start`."""
    heads, depth, item = [], 0, ""
    for c in text[start:]:
        if c == "{":
            depth += 1
            if depth == 1:
                continue
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        if depth == 1 and c == ",":
            heads.append(item)
            item = ""
        elif depth >= 1:
            item += c
    heads.append(item)
    out = []
    for h in heads:
        m = re.match(r"\s*([a-z_][a-z0-9_]*)", h)
        if m and m.group(1) not in ("self", "super", "crate"):
            out.append(m.group(1))
    return out


def crate_refs(code, path_re=PATH_RE):
    """(line, first segment) of every `crate::` path (or `path_re` path) in `code`."""
    for m in path_re.finditer(code):
        line = code.count("\n", 0, m.start()) + 1
        if m.group(1) == "{":
            for head in group_heads(code, m.end() - 1):
                yield line, head
        else:
            yield line, m.group(1)


def find_cycle(graph):
    """One cycle of `graph` (a list of nodes, first repeated at the end), or None."""
    color = {}
    stack = []

    def visit(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if color.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in color:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        color[u] = 2
        return None

    for u in sorted(graph):
        if u not in color:
            found = visit(u)
            if found:
                return found
    return None


def check_crate(src, layers, label, show_graph):
    """The errors of one crate rooted at `src` against `layers`; prints its graph if asked."""
    layer_of = {}
    for i, (_, mods, _) in enumerate(layers):
        for m in mods:
            layer_of[m] = i

    files = []
    for dirpath, _, names in os.walk(src):
        for name in names:
            if name.endswith(".rs"):
                files.append(os.path.relpath(os.path.join(dirpath, name), src))
    files.sort()

    present = {f.split("/")[0].removesuffix(".rs") for f in files} - ROOTS
    errors = []
    for m in sorted(present - set(layer_of)):
        errors.append(f"module `{m}` of {label} is not in its layer table in {sys.argv[0]}")
    for m in sorted(set(layer_of) - present):
        errors.append(f"the layer table names `{m}`, which is not a module of {label}")

    graph = {m: set() for m in present}
    lib_uses = {m: set() for m in present}
    where = {}
    siblings = {}  # folder module -> {file stem -> set of sibling stems it imports}
    for rel in files:
        parts = rel.split("/")
        top = parts[0].removesuffix(".rs")
        if top in ROOTS:
            continue
        with open(os.path.join(src, rel), encoding="utf-8") as f:
            code = strip_comments(f.read())
        for line, target in crate_refs(code):
            if target in present and target != top:
                graph[top].add(target)
                where.setdefault((top, target), []).append(f"{label}/{rel}:{line}")
        lib_uses[top].update(t for _, t in crate_refs(code, LIB_PATH_RE))
        # Sibling files of a folder module (top/x.rs, not mod.rs or deeper files).
        if len(parts) == 2 and parts[1] != "mod.rs":
            stem = parts[1].removesuffix(".rs")
            deps = siblings.setdefault(top, {}).setdefault(stem, set())
            refs = [t for _, t in crate_refs(code.replace(f"crate::{top}::", "crate::"))]
            refs += SUPER_RE.findall(code)
            deps.update(r for r in refs if r != stem)

    for a in sorted(graph):
        for b in sorted(graph[a]):
            if a in layer_of and b in layer_of and layer_of[b] > layer_of[a]:
                errors.append(
                    f"upward import: `{a}` ({layers[layer_of[a]][0]}) uses `{b}` "
                    f"({layers[layer_of[b]][0]}) at " + ", ".join(where[(a, b)][:5])
                )
            elif a in layer_of and b in layer_of and layer_of[b] == layer_of[a]:
                if not layers[layer_of[a]][2]:
                    errors.append(
                        f"`{a}` uses `{b}` of its own layer ({layers[layer_of[a]][0]}), "
                        "which the layer table does not allow, at "
                        + ", ".join(where[(a, b)][:5])
                    )
    cycle = find_cycle(graph)
    if cycle:
        hops = [f"{a} -> {b} ({where[(a, b)][0]})" for a, b in zip(cycle, cycle[1:])]
        errors.append("import cycle between top-level modules: " + "; ".join(hops))

    for top, files_deps in sorted(siblings.items()):
        stems = set(files_deps)
        sub = {s: {d for d in deps if d in stems} for s, deps in files_deps.items()}
        cycle = find_cycle(sub)
        if cycle:
            errors.append(
                f"import cycle between files of `{label}/{top}/`: "
                + " -> ".join(f"{top}/{s}.rs" for s in cycle)
            )

    if show_graph:
        print(f"{label}:")
        for i, (name, mods, open_) in reversed(list(enumerate(layers))):
            print(f"{i} {name}{'' if open_ else ' (no imports within the layer)'}:")
            for m in mods:
                uses = sorted(graph.get(m, ())) + [f"rebindgw::{u}" for u in sorted(lib_uses[m])]
                print(f"    {m} -> {' '.join(uses) or '-'}")
    return errors, len(present)


def main(argv):
    show_graph = "--graph" in argv
    args = [a for a in argv if not a.startswith("--")]
    root = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    errors, count = [], 0
    for sub, layers in (("src", LAYERS), ("tools/src", TOOLS_LAYERS)):
        e, n = check_crate(os.path.join(root, sub), layers, sub, show_graph)
        errors += e
        count += n
    for e in errors:
        print(f"check-layers: {e}", file=sys.stderr)
    if errors:
        return 1
    layers = len(LAYERS) + len(TOOLS_LAYERS)
    print(f"check-layers: {count} modules of 2 crates in {layers} layers, all imports point down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
