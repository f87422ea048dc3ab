"""The package's shape, as docs/architecture.md describes it: subpackages in layers, each module
importing only from its own layer or the ones below (lazy imports inside functions included), no
import cycle, training never importing the benchmark code, no subpackage too crowded to scan and no
function or module too long to read in one sitting."""

import ast

from conftest import ROOT

PKG = ROOT / "src" / "gpt2repro"
# lowest first, the same list as docs/architecture.md: each entry a subpackage (every module in it
# shares its layer) or one of the few modules at the top of the package
LAYERS = [
    {"__init__", "errors", "files"},
    {"config"},
    {"text"},
    {"data"},
    {"model"},
    {"parallel"},
    {"checkpoint"},
    {"generation"},
    {"evals", "interop"},
    {"training"},
    {"serve"},
    {"bench"},
    {"api"},
    {"cli", "cliargs", "__main__"},
]
TOP_LEVEL = {"__init__", "__main__", "api", "cli", "cliargs", "errors"}  # modules outside any subpackage
# the one import that goes up: the package re-exports the Python API's names, imported on first use
# (PEP 562 `__getattr__`), so `import gpt2repro` loads nothing and `gpt2repro.load` is the api's
REEXPORT = {("__init__", "api")}
MAX_PACKAGE_MODULES = 10
LAYER = {entry: i for i, layer in enumerate(LAYERS) for entry in layer}
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
    """Modules of the package that `name` imports, anywhere in its body: `from X import a` names
    module X.a when there is one (else X), relative or absolute alike."""
    is_package = name != "__init__" and (PKG / name.replace(".", "/")).is_dir()
    package = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gpt2repro":
            prefix = node.module.removeprefix("gpt2repro").lstrip(".")
        else:
            if isinstance(node, ast.Import):
                out |= {a.name.removeprefix("gpt2repro").lstrip(".") or "__init__" for a in node.names}
            continue
        for alias in node.names:
            full = f"{prefix}.{alias.name}" if prefix else alias.name
            out.add(full if full in known else prefix or "__init__")
    return {m for m in out if m in known and m != name}


def _owner(module: str) -> str | None:
    """The LAYERS entry a module belongs to: its subpackage, or itself at the top of the package."""
    head = module.split(".")[0]
    return head if head in LAYER and (head in TOP_LEVEL or (PKG / head).is_dir()) else None


def _layer(module: str) -> int:
    return LAYER[_owner(module)]


def test_every_module_belongs_to_a_package_of_the_layers():
    modules = set(_modules())
    assert sorted(m for m in modules if _owner(m) is None) == []
    assert {m for m in modules if "." not in m and not (PKG / m).is_dir()} == TOP_LEVEL
    assert {m.split(".")[0] for m in modules} == set(LAYER)  # no entry names a package that is gone


def test_no_subpackage_holds_too_many_modules():
    counts = {}
    for m in _modules():
        if "." in m:
            counts[m.split(".")[0]] = counts.get(m.split(".")[0], 0) + 1
    assert {p: n for p, n in counts.items() if n > MAX_PACKAGE_MODULES} == {}


def test_imports_only_go_down_the_layers():
    modules = _modules()
    known = set(modules)
    wrong = [
        f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
        for name, tree in modules.items()
        for dep in _imports(name, tree, known)
        if _layer(dep) > _layer(name) and (name, dep) not in REEXPORT
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
    training = reachable("training.train")
    assert not {m for m in training if m.startswith("bench")}
    assert "checkpoint.gathered" in training and "training.mfu" in training  # the walk sees imports


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


def test_model_gpt_py_is_the_architecture():
    """Only the network's modules and what moves weights in and out of it; training's kernels are in
    model/ops.py, the KV cache in model/kvcache.py, decoding speed in generation/decoding.py: a block
    has one forward (taking an optional cache), its layers are nn.Linear, and nothing in the file
    asks which CPU it runs on."""
    text = _sources()["model.gpt"]
    tree = ast.parse(text)
    top = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert top == {"CausalSelfAttention", "MLP", "Block", "GPT", "WeightsMismatch", "load_state_strict"}
    assert not [n for n in tree.body if isinstance(n, ast.Assign)]  # no module-level state (caches, tables)
    block = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Block")
    assert [n.name for n in block.body if isinstance(n, ast.FunctionDef)] == ["__init__", "forward"]
    built = {
        ast.unparse(n.func)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("Linear")
    }
    assert built == {"nn.Linear"}
    assert not [
        w for w in ("cpuinfo", "vendor", "GenuineIntel", "AuthenticAMD", "get_num_threads") if w in text
    ]


def test_the_model_imports_nothing_of_decoding():
    """Decoding is applied to a model from outside (generation/decoding.py): model/ knows nothing of
    generation/."""
    modules = _modules()
    known = set(modules)
    assert {
        f"{name} imports {dep}"
        for name, tree in modules.items()
        if name.startswith("model")
        for dep in _imports(name, tree, known)
        if dep.startswith("generation")
    } == set()
