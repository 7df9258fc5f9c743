"""The import structure: scripts sit on top, packages never import them, nothing imports in a circle,
and what each entry point can import is the six run-time dependencies plus the standard library.

Imports are read from the source (every `import` statement, the ones inside functions too), so a
lazy import cannot hide an edge; one entry point is also run, to see what a real run loads."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in ("tests",))
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py"))
RUNTIME = {"torch", "numpy", "safetensors", "tokenizers", "PIL", "tqdm"}
ENTRY_POINTS = [*SCRIPTS, "clip.__main__", "faces.__main__", "world.__main__", "world.pretrain", "world.score", "world.sdedit",
                "dreambooth.evaluate", "porting.__main__",
                "diffusion.checkpoints.convert"]
OPTIONAL = {"tensorboard": "common.training"}   # imported only behind --report_to tensorboard, by this module
REFERENCE_LIBRARIES = ("transformers", "diffusers", "timm", "open_clip", "cv2", "accelerate", "peft", "tensorboard")


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_ours(name: str) -> bool:
    return name.split(".")[0] in (*PACKAGES, *SCRIPTS)


def imports_of(name: str) -> set[str]:
    """Every module `name` imports anywhere in its source: ours by full dotted name, others by top name."""
    out = set()
    for node in ast.walk(ast.parse(module_file(name).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # `from package import module` imports the module too
            out |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return {m if is_ours(m) else m.split(".")[0] for m in out if m != "__future__"}


def our_modules() -> list[str]:
    names = list(SCRIPTS)
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


def graph() -> dict[str, set[str]]:
    return {m: {i for i in imports_of(m) if is_ours(i) and module_file(i)} for m in our_modules()}


def test_packages_never_import_scripts():
    upward = [f"{m} imports {i}" for m, deps in graph().items() if m.split(".")[0] in PACKAGES
              for i in deps if i in SCRIPTS]
    assert not upward, "scripts sit on top; move what they share into a package:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(edges[m]):
            if m.startswith(d + "."):
                continue   # a module of a package imports its own package's __init__: not a cycle
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def closure(entry: str) -> set[str]:
    """Every module an entry point can reach, ours and others, with their parent packages."""
    seen, todo = set(), [entry]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if is_ours(m) and module_file(m):
            parents = [".".join(m.split(".")[:k]) for k in range(1, m.count(".") + 1)]
            todo += [*imports_of(m), *parents]
    return seen


def test_entry_points_import_only_the_runtime_dependencies_and_the_standard_library():
    for entry in ENTRY_POINTS:
        reach = closure(entry)
        third_party = {m for m in reach if not is_ours(m) and m not in sys.stdlib_module_names}
        allowed = RUNTIME | {lib for lib, importer in OPTIONAL.items() if importer in reach}
        assert third_party <= allowed, f"{entry} can import {sorted(third_party - allowed)}"
        for lib, importer in OPTIONAL.items():
            assert lib not in third_party or importer in reach


def test_optional_tensorboard_import_sits_behind_its_flag():
    """The one import of tensorboard is inside the branch that --report_to tensorboard takes."""
    source = (ROOT / "common" / "training.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "tensorboard" in ast.unparse(node.test):
            guarded = {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
            if "torch.utils.tensorboard" in guarded:
                return
    raise AssertionError("common/training.py imports tensorboard outside an `if report_to == 'tensorboard'` branch")


def test_a_real_run_loads_no_reference_library(tmp_path):
    """sample.py on the embedded model, one step: what it loaded is torch's world, never a reference
    implementation or tensorboard."""
    probe = ("import json, runpy, sys; sys.argv = ['sample.py', '--ddim_steps', '1', '--n_samples', '1', "
             f"'--outdir', {str(tmp_path)!r}]; runpy.run_path('sample.py', run_name='__main__'); "
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    loaded = set(json.loads(run.stdout.strip().splitlines()[-1]))
    assert not loaded & set(REFERENCE_LIBRARIES), sorted(loaded & set(REFERENCE_LIBRARIES))
    assert {"torch", "tokenizers", "PIL"} <= loaded    # (safetensors files are read by common/state_dict.py)
