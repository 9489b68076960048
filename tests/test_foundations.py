"""The foundations every layer reads: one input-error hierarchy, one image reader, one set of segment rules,
and the direction of the imports between the package's folders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from latentvl.errors import ImageReadError, InputError, LatentInputError
from latentvl.images import image_file_problem, open_rgb, read_image
from latentvl.segments import check_latent_inputs, segment_problems

SRC = Path(__file__).resolve().parents[1] / "src" / "latentvl"


# ------------------------------------------------------------------------------------------------ errors
def test_every_input_error_is_one_family_with_distinct_members():
    from latentvl.errors import (
        CollatorInputError,
        DatasetImportError,
        LatentConfigError,
        ModelFormatError,
        RecordError,
        SampleError,
        TrainConfigError,
        TrainDataError,
    )

    members = [LatentConfigError, CollatorInputError, DatasetImportError, RecordError, SampleError,
               LatentInputError, ModelFormatError, TrainConfigError, TrainDataError, ImageReadError]
    for cls in members:
        assert issubclass(cls, InputError) and issubclass(cls, ValueError)
        assert cls.__module__ == "latentvl.errors"
    for a in members:  # a handler of one kind does not catch another
        assert [b for b in members if issubclass(a, b)] == [a]
    assert SampleError("too_long", "x").kind == "too_long"


# ------------------------------------------------------------------------------------------------ images
def test_read_image_kinds_and_transparency(tmp_path):
    rgba = Image.new("RGBA", (6, 4), (255, 0, 0, 0))  # fully transparent: white once read
    rgba.save(tmp_path / "t.png")
    for value in (tmp_path / "t.png", str(tmp_path / "t.png"), rgba):
        im = read_image(value)
        assert im.mode == "RGB" and im.size == (6, 4) and im.getpixel((0, 0)) == (255, 255, 255)
        assert read_image(value, header_only=True) == (6, 4)
    assert open_rgb(tmp_path / "t.png").getpixel((1, 1)) == (255, 255, 255)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases = [(tmp_path / "none.png", "missing_image", "does not exist"),
             (tmp_path / "bad.png", "unreadable_image", "cannot read image"),
             (3, "invalid_input", "expected a PIL image or a path, got int")]
    for value, kind, text in cases:
        with pytest.raises(ImageReadError, match=text) as err:
            read_image(value)
        assert err.value.kind == kind
    assert image_file_problem(tmp_path / "t.png") is None
    assert image_file_problem(tmp_path / "none.png") == "does not exist"
    assert image_file_problem(tmp_path) == "is not a file"
    assert image_file_problem(tmp_path / "bad.png").startswith("cannot be opened as an image")


# ---------------------------------------------------------------------------------------------- segments
LATENT = 9


@st.composite
def batches(draw):
    """A valid batch of latent segments, then one random corruption (or none)."""
    B = draw(st.integers(1, 3))
    S = 24
    ids = torch.zeros(B, S, dtype=torch.long)
    segments, budgets = [], []
    for b in range(B):
        n = draw(st.integers(0, 3))
        segs, buds, pos = [], [], 1
        for i in range(n):
            length = draw(st.integers(1, 3))
            if pos + length + 1 > S:
                break
            ids[b, pos:pos + length] = LATENT
            segs.append((pos, pos + length, i))
            buds.append(length)
            pos += length + 1
        segments.append(segs)
        budgets.append(buds)
    corruption = draw(st.sampled_from(["none", "token", "budget", "index", "drop"]))
    flat = [(b, i) for b in range(B) for i in range(len(segments[b]))]
    if corruption != "none" and flat:
        b, i = draw(st.sampled_from(flat))
        start, end, img = segments[b][i]
        if corruption == "token":
            ids[b, start] = 1
        elif corruption == "budget":
            budgets[b][img] += 1
        elif corruption == "index":
            segments[b][i] = (start, end, img + 5)
        else:
            segments[b].pop(i)
    return ids, segments, budgets


@settings(max_examples=60, deadline=None)
@given(batches())
def test_check_latent_inputs_raises_exactly_the_first_problem(batch):
    ids, segments, budgets = batch
    problems = list(segment_problems(ids, segments, budgets, LATENT, "A", ["a", "b", "c"]))
    if not problems:
        assert check_latent_inputs(ids, segments, budgets, LATENT, "A") == segments
        return
    with pytest.raises(LatentInputError) as err:
        check_latent_inputs(ids, segments, budgets, LATENT, "A", ["a", "b", "c"])
    assert str(err.value) == problems[0].message
    assert problems[0].sample is None or f"(id {'abc'[problems[0].sample]!r})" in problems[0].message


def test_pre_training_checks_report_the_shared_segment_rules():
    from latentvl.training.checks import check_segment_lengths, check_segment_tokens

    ids = torch.zeros(1, 8, dtype=torch.long)
    ids[0, 2:4] = LATENT
    batch = {"input_ids": ids, "latent_segments": [[(2, 4, 0)]], "latent_budgets": [[2]], "ids": ["r"]}
    assert check_segment_tokens(batch, LATENT).passed and check_segment_lengths(batch, "A").passed
    bad = dict(batch, input_ids=ids.clone())
    bad["input_ids"][0, 3] = 1
    [problem] = [p for p in segment_problems(bad["input_ids"], bad["latent_segments"], bad["latent_budgets"],
                                             LATENT, "A", ["r"])]
    assert problem.kind == "tokens" and check_segment_tokens(bad, LATENT).detail == problem.message
    assert check_segment_lengths(bad, "A").passed  # a token problem is check 1's, not check 2's


# ------------------------------------------------------------------------------------------------ layers
# Each folder (or top-level module) and its tier: a module imports only from its own tier or lower ones.
TIERS = {
    "errors": 0, "fileio": 0, "tokens": 0, "budget": 0, "config": 0, "images": 0, "segments": 0, "processor": 0,
    "data": 1, "model": 1,
    "training": 2, "inference": 2, "evaluation": 2,
    "integrations": 3, "reports": 3,
    "commands": 4, "cli": 4, "recipes": 4,
}


def _imports(path: Path) -> set[str]:
    """The ``latentvl`` modules ``path`` imports, absolute."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    package = parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            out |= {name} if not (node.level and not node.module) else {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.split(".")[0] == "latentvl"}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _top_level_names(tree: ast.Module) -> tuple[set[str], list[str]]:
    """The names a module defines itself, and those its ``__all__`` lists."""
    defined, listed = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.add(name.id)
                        if name.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                            listed = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return defined, listed


def test_one_import_path_per_name():
    """No module outside ``__init__.py`` only re-exports, and none lists in ``__all__`` a name it does not
    define: every public name has one home."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined, listed = _top_level_names(tree)
        if tree.body and all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)) for n in tree.body):
            wrong.append(f"{path.relative_to(SRC)} only re-exports")
        wrong += [f"{path.relative_to(SRC)} lists {n} but does not define it" for n in listed if n not in defined]
    assert not wrong, wrong


def test_names_are_imported_from_their_home():
    """``from latentvl.X import name`` anywhere in the package names the module that defines ``name``."""
    homes = {}
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        homes[module] = _top_level_names(ast.parse(path.read_text(encoding="utf-8")))[0]
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        package = list(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("latentvl")):
                continue
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if module == "latentvl" or module not in homes:
                continue
            wrong += [f"{path.relative_to(SRC)}: {a.name} from {module}" for a in node.names
                      if a.name not in homes[module] and f"{module}.{a.name}" not in homes]
    assert not wrong, wrong


def test_imports_point_from_the_command_line_down_to_the_foundations():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        here = _area(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if here == "__init__":
            continue  # the front door names (and lazily imports) the public API of every layer
        assert here in TIERS, f"{path}: a folder without a tier"
        for target in _imports(path):
            there = _area(target)
            if there != "__init__" and TIERS[there] > TIERS[here]:
                wrong.append(f"{path.relative_to(SRC)} imports {target}")
            if here == "data" and there == "model":
                wrong.append(f"{path.relative_to(SRC)} imports {target} (data/ never imports model/)")
    assert not wrong, wrong


def test_decoded_format_reads_files_and_bytes(tmp_path):
    import io

    from latentvl.images import decoded_format

    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    assert decoded_format(tmp_path / "a.png") == decoded_format(buf.getvalue()) == "PNG"
    with pytest.raises(ImageReadError) as err:
        decoded_format(buf.getvalue()[:20])  # header only: the pixels do not decode
    assert err.value.kind == "unreadable_image"


def test_library_modules_carry_no_command_line():
    """argparse and the subcommands' ``add_arguments``/``run`` live in latentvl.commands (and cli.py) only."""
    carriers = []
    for path in sorted(SRC.rglob("*.py")):
        area = _area(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if area in ("commands", "cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if "argparse" in {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} or \
                {"add_arguments", "run"} <= names:
            carriers.append(str(path.relative_to(SRC)))
    assert not carriers, carriers


# ------------------------------------------------------------------------------------------------ front door
def test_front_door_names_resolve_to_their_homes():
    import importlib

    import latentvl

    for name, home in latentvl._HOMES.items():
        assert getattr(latentvl, name) is getattr(importlib.import_module(home), name), name
    assert set(latentvl.__all__) == set(latentvl._HOMES) and "train" in dir(latentvl)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        latentvl.nope  # noqa: B018


def test_import_latentvl_is_light():
    import subprocess
    import sys

    code = "import sys, latentvl; print(sorted(m for m in ('transformers', 'accelerate', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_python_example_uses_the_front_door_only():
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(block)
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [ast.unparse(n) for n in imports] == ["import latentvl"]
    import latentvl

    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "latentvl"}
    assert used and used <= set(latentvl.__all__), used - set(latentvl.__all__)


def test_tests_mirror_the_package():
    """Each folder of tests/ is a package folder of latentvl (foundations' tests stay at the top)."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders and folders <= packages, folders - packages
    assert not [p.name for p in tests.glob("test_*.py") if p.stem not in ("test_foundations", "test_config_budget")]
