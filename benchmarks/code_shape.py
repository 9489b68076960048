"""The shape of latentvl's source: files, lines, the longest files and functions, and the import graph's
arrows between layers (the tiers of tests/test_foundations.py), with those that run upwards.

    python benchmarks/code_shape.py [--src src/latentvl]

Prints one table; nothing is written.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _functions(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node.end_lineno - node.lineno + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src" / "latentvl")
    args = parser.parse_args()
    from test_foundations import TIERS, _area, _imports  # the layer rules, in one place

    files = sorted(args.src.rglob("*.py"))
    lines = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    funcs = []
    arrows, upward, reexports = set(), [], 0
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        funcs += [(f"{path.relative_to(args.src)}:{n}", k) for n, k in _functions(tree)]
        body = tree.body
        if path.name != "__init__.py" and body and all(
                isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)) for n in body):
            reexports += 1
        here = _area(".".join(path.relative_to(args.src.parent).with_suffix("").parts))
        for target in _imports(path):
            there = _area(target)
            if here != there and "__init__" not in (here, there):
                arrows.add((here, there))
                if TIERS.get(there, 0) > TIERS.get(here, 0):
                    upward.append(f"{path.relative_to(args.src)} -> {target}")
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    print(f"src files: {len(files)}  lines: {sum(lines.values())}  re-export-only modules: {reexports}")
    print(f"test files: {len(tests)}  test dirs: {len({t.parent for t in tests})}")
    print("longest files:", ", ".join(f"{p.relative_to(args.src)} {n}" for p, n in
                                     sorted(lines.items(), key=lambda kv: -kv[1])[:5]))
    print("longest functions:", ", ".join(f"{n} {k}" for n, k in sorted(funcs, key=lambda f: -f[1])[:5]))
    print(f"functions over 80 lines: {sum(k > 80 for _, k in funcs)}")
    print(f"files over 700 lines: {sum(n > 700 for n in lines.values())}")
    print(f"arrows between layers: {len(arrows)}  upward: {len(upward)}")
    for u in upward:
        print("  upward:", u)


if __name__ == "__main__":
    main()
