"""The docs' citations of the code still name what they say (STYLE.md rule 18).

- A file cited with a symbol (`clip/text_model.py` `quick_gelu`, `vae.py` `RESNET_EPS`, `common/images.py`'s
  `load_image`, `clip/tokenizer.py`: `CLIPTokenizer.from_pretrained(path)`): the file exists (a bare
  name must be the only file of that name in the repository) and defines or assigns the symbol.
- A file cited with a line number (`vae.py:31`): refused. A line moves with every edit above it; cite
  the symbol instead.
- A path into the repository (`diffusion/checkpoints/configs.py`): the file exists.
- The README's reading order: every file it names exists, and every equation it cites for a file
  ("`diffusion/samplers/ddim.py` (DDIM eq. 9, 12, 16)") is cited in that file, under that paper's name.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = {".git", ".venv", ".venv-dev", "runs", "outputs", "__pycache__"}

PATH = r"(?<![\w/.-])`?((?:[\w.-]+/)*[\w-]+\.py)`?"
LINE_REFERENCE = re.compile(PATH + r":(\d+)(?:-\d+)?")
SYMBOL_REFERENCE = re.compile(PATH + r"(?:'s|:)?[ \t]+`([A-Za-z_][\w.]*)(?:\([^`]*\))?`")
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "toml", "txt", "png", "safetensors", "ckpt", "pt", "sh", "yaml", "yml"}


@functools.cache
def python_files() -> dict[str, list[Path]]:
    """Every .py file of the repository by its name."""
    by_name: dict[str, list[Path]] = {}
    for path in ROOT.rglob("*.py"):
        if not SKIP & set(path.relative_to(ROOT).parts):
            by_name.setdefault(path.name, []).append(path)
    return by_name


def resolve(cited: str) -> tuple[Path | None, str]:
    """The file a citation names (a path from the repository root, or a name only one file has)."""
    if (ROOT / cited).is_file():
        return ROOT / cited, ""
    if "/" in cited and (ROOT / cited.split("/")[0]).exists():
        return None, "no such file"
    candidates = [p for p in python_files().get(Path(cited).name, [])
                  if p.relative_to(ROOT).as_posix().endswith(cited)]
    if len(candidates) == 1:
        return candidates[0], ""
    if candidates:
        return None, f"ambiguous: {', '.join(str(p.relative_to(ROOT)) for p in candidates)} (name the folder)"
    return None, "no such file"


@functools.cache
def definitions(path: Path) -> frozenset[str]:
    """The names a module defines or assigns: its functions, classes and globals, and each class's
    methods and attributes (class-level, or `self.x = ...` in a method), as `Class.name` and `name`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()

    def assigned(node) -> list[str]:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names.update(assigned(node))
        if not isinstance(node, ast.ClassDef):
            continue
        members: set[str] = set()
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                members.add(item.name)
            elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                members.update(assigned(item))
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Assign, ast.AnnAssign)):
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                members.update(t.attr for t in targets if isinstance(t, ast.Attribute)
                               and isinstance(t.value, ast.Name) and t.value.id == "self")
        names |= members | {f"{node.name}.{m}" for m in members}
    return frozenset(names)


def citations(text: str, pattern: re.Pattern) -> list[tuple[int, re.Match]]:
    return [(text.count("\n", 0, m.start()) + 1, m) for m in pattern.finditer(text)]


def problems_in(text: str, where: str) -> list[str]:
    found = []
    for line, m in citations(text, LINE_REFERENCE):
        found.append(f"{where}:{line}: {m.group(0).strip('`')} cites a line number; cite a symbol instead")
    for line, m in citations(text, SYMBOL_REFERENCE):
        cited, symbol = m.group(1), m.group(2)
        if symbol.rsplit(".", 1)[-1] in FILE_SUFFIXES:   # "`model.py` `weights.py`": two files, no symbol
            continue
        path, why = resolve(cited)
        if path is None:
            found.append(f"{where}:{line}: {cited} (cited with `{symbol}`): {why}")
        elif symbol not in definitions(path):
            found.append(f"{where}:{line}: {cited} defines no `{symbol}`")
    for line, m in citations(text, re.compile(PATH)):
        cited = m.group(1)
        top = cited.split("/")[0]   # runs/ and outputs/ hold a user's own (git-ignored) files: not checked
        if "/" in cited and top not in SKIP and (ROOT / top).is_dir() and not (ROOT / cited).is_file():
            found.append(f"{where}:{line}: {cited}: no such file")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_citation_of_the_code_names_what_it_says(doc):
    problems = problems_in(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_moved_citation():
    """What these rules say of citations like docs/porting.md's old ones (issue 36.1): line numbers refused,
    a symbol that is not in its file and a file that does not exist named."""
    text = ("- quick_gelu (clip/text_model.py:97)\n- `vae.py` `RESNET_EPS`, `vae.py` `NO_SUCH_NAME`\n"
            "- `diffusion/models/attention.py` `SpatialTransformer.arrange_map`, `unet.py` `UNetConfig.sd_v1`\n"
            "- `diffusion/models/nothing.py` `x`; `diffusion/gone.py`\n")
    problems = problems_in(text, "docs/_citations_under_test.md")
    assert problems == [
        "docs/_citations_under_test.md:1: clip/text_model.py:97 cites a line number; cite a symbol instead",
        "docs/_citations_under_test.md:2: vae.py defines no `NO_SUCH_NAME`",
        "docs/_citations_under_test.md:4: diffusion/models/nothing.py (cited with `x`): no such file",
        "docs/_citations_under_test.md:4: diffusion/models/nothing.py: no such file",
        "docs/_citations_under_test.md:4: diffusion/gone.py: no such file",
    ], problems


# ---- the README's reading order -----------------------------------------------------------------------------
NUMBERS = r"(\d+(?:\s*(?:,|-|and)\s*\d+)*)"                  # 4; 9, 12, 16; 1-4; 2 and 3
EQUATIONS = re.compile(r"((?:[A-Z][\w&+-]*(?: et al\.| & \w+)?|the paper's)) eq\. " + NUMBERS)


def numbers(cited: str) -> set[int]:
    """'9, 12, 16' -> {9, 12, 16}; '1-4' -> {1, 2, 3, 4}; '2 and 3' -> {2, 3}."""
    out = set()
    for part in re.split(r",|\band\b", cited):
        lo, _, hi = part.strip().partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def cited_equations(text: str) -> set[int]:
    return {n for m in re.finditer(r"\beq\. ?" + NUMBERS, text) for n in numbers(m.group(1))}


def reading_order() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    return re.split(r"\n(?=\d+\. )", section.strip())


def test_the_reading_order_names_files_that_cite_its_equations():
    items = [item for item in reading_order() if re.match(r"\d+\. ", item)]
    assert len(items) >= 8, items
    problems = []
    for item in items:
        pieces = re.split(r"`([\w/.-]+\.py)`", item)        # text, file, text, file, text ...
        current = None
        for i, piece in enumerate(pieces):
            if i % 2:
                current = piece
                if not (ROOT / piece).is_file():
                    problems.append(f"reading order: {piece}: no such file")
                continue
            for m in EQUATIONS.finditer(piece):
                paper, wanted = m.group(1), numbers(m.group(2))
                if current is None or not (ROOT / current).is_file():
                    problems.append(f"reading order: {m.group(0)!r} follows no file")
                    continue
                source = (ROOT / current).read_text(encoding="utf-8")
                key = paper.split()[0]
                if paper != "the paper's" and key not in source:
                    problems.append(f"reading order: {current} does not name {key} ({m.group(0)!r})")
                missing = wanted - cited_equations(source)
                if missing:
                    problems.append(f"reading order: {current} cites no eq. {sorted(missing)} ({m.group(0)!r})")
    assert not problems, "\n".join(problems)
