"""The package's shape, as docs/architecture.md describes it: each module imports only from its own
layer or the ones below (lazy imports inside functions included), there is no import cycle, training
never imports the benchmark code, and no function or module is too long to read in one sitting."""

import ast

from conftest import ROOT

PKG = ROOT / "src" / "gpt2repro"
# lowest first; the same list as docs/architecture.md
LAYERS = [
    {
        "__init__",
        "errors",
        "config",
        "overrides",
        "configfile",
        "presets",
        "precision",
        "fsio",
        "lock",
        "jsonio",
    },
    {"assets"},
    {"model", "ops", "kvcache", "tokenizer", "chat", "sampling", "tokentext"},
    {
        "data.shards",
        "data.loader",
        "data.sources",
        "data.sink",
        "data.hubshards",
        "data.prepare",
        "data.conversations",
        "data.records",
    },
    {"optim", "clock", "muon", "checkpoint", "ckptdir", "sharded", "distributed", "parallelize", "mfu"},
    {"evals.hellaswag", "generate", "hf", "gguf_export", "chat_session", "evals.chat"}
    | {"evals.packing", "evals.core_data", "evals.core"},
    {"train", "plan", "checkpointer", "metrics", "sft"},
    {"evals.report", "evals.harness", "plot", "chat_cli", "serve.engine", "serve.protocol"}
    | {"serve.generation", "serve.guard", "serve.metrics", "serve.app", "serve.run"},
    {
        "bench.names",
        "bench.reference",
        "bench.common",
        "bench.inference",
        "bench.learn",
        "bench.chat",
        "bench.runners",
        "bench.serving",
        "bench.llamacpp",
    },
    {"cli", "cliargs", "__main__"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}
DECLARATIVE = {("cliargs", "build_parser")}  # the argument parser: a list of options, not logic
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def _sources() -> dict[str, str]:
    found = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = path.read_text()
    return found


def _modules() -> dict[str, ast.Module]:
    return {name: ast.parse(text) for name, text in _sources().items()}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports, anywhere in its body."""
    package = name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{prefix}.{alias.name}" if prefix else alias.name
                out.add(full if full in known else prefix or "__init__")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for n in [mod] if mod else [a.name for a in node.names]:
                if n.startswith("gpt2repro"):
                    out.add(n.removeprefix("gpt2repro").lstrip(".") or "__init__")
    return {m for m in out if m in known and m != name}


def test_every_module_has_a_layer():
    assert set(_modules()) - {"bench", "data", "evals", "serve"} == set(LAYER)


def test_imports_only_go_down_the_layers():
    modules = _modules()
    known = set(modules)
    wrong = [
        f"{name} (layer {LAYER[name]}) imports {dep} (layer {LAYER[dep]})"
        for name, tree in modules.items()
        if name in LAYER
        for dep in _imports(name, tree, known)
        if dep in LAYER and LAYER[dep] > LAYER[name]
    ]
    assert wrong == []


def test_no_import_cycles_and_training_never_imports_bench():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, tree, known) for name, tree in modules.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert [m for m in graph if m in reachable(m)] == []
    assert not {m for m in reachable("train") if m.startswith("bench")}
    assert "checkpoint" in reachable("train") and "mfu" in reachable("train")  # the walk sees imports


def test_functions_fit_on_a_screen():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (name, node.name) not in DECLARATIVE:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_modules_fit_in_one_sitting():
    lines = {name: len(text.splitlines()) for name, text in _sources().items()}
    assert sorted(name for name, n in lines.items() if n > MAX_MODULE_LINES) == []


def test_model_py_is_the_architecture():
    """Only the network's modules and what moves weights in and out of it; kernels are in ops.py, the
    KV cache in kvcache.py."""
    tree = _modules()["model"]
    top = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert top == {"CausalSelfAttention", "MLP", "Block", "GPT", "WeightsMismatch", "load_state_strict"}
    assert not [n for n in tree.body if isinstance(n, ast.Assign)]  # no module-level state (caches, tables)
