"""dvc.yaml is the one description of the stage graph: a stage's code deps are exactly the project modules
it imports (a change elsewhere does not rerun it), and every path its command reads or writes is a declared
dep or output."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PACKAGES = ("dddm", "pipeline")


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(module: str) -> set[Path]:
    """The project files `module` imports, transitively (package __init__ files included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            todo.append(".".join(parts[:i]))
        package = name if path.name == "__init__.py" else ".".join(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                todo.append(base)
                todo += [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
    return {p for p in seen if p.relative_to(ROOT).parts[0] in PACKAGES and not docstring_only(p)}


def docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def stages() -> list[tuple[str, dict]]:
    """(name, definition) per stage, with `${item.method}` filled in for one method."""
    text = (ROOT / "dvc.yaml").read_text().replace("${item.method}", "udddm")
    return list(yaml.safe_load(text)["stages"].items())


def declared(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def code_files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*.py") if not docstring_only(p)}


def code_deps(modules: list[str]) -> list[str]:
    """What a stage running `modules` depends on: the files they import, a directory where every module in
    it is imported (dddm/methods: the params' schema imports every method)."""
    files = set().union(*map(project_imports, modules))
    whole = sorted({d for f in files for d in f.parents if ROOT in d.parents and d != ROOT / d.relative_to(ROOT).parts[0]
                    and code_files(d) <= files}, key=lambda d: len(d.parts))
    kept = [d for d in whole if not any(o in d.parents for o in whole)]
    paths = kept + [f for f in files if not any(d in f.parents for d in kept)]
    # the stage's own scripts first, as dvc.yaml lists them
    return sorted((str(p.relative_to(ROOT)) for p in paths), key=lambda p: (not p.startswith("pipeline/"), p))


@pytest.mark.parametrize("name, stage", stages(), ids=[n for n, _ in stages()])
def test_code_dependencies_are_what_the_stage_imports(name, stage):
    modules = re.findall(r"\bpipeline\.\w+", stage["cmd"])  # the stage's, and the worker module a launcher runs
    code = [d for d in declared(stage["deps"]) if d.split("/")[0] in PACKAGES]
    expected = code_deps(modules)
    assert sorted(code) == sorted(expected), (
        f"stage {name}: imports {sorted(set(expected) - set(code))} without depending on them, depends on "
        f"{sorted(set(code) - set(expected))} without importing them; its code deps are:\n      - "
        + "\n      - ".join(expected))


@pytest.mark.parametrize("name, stage", stages(), ids=[n for n, _ in stages()])
def test_every_path_in_the_command_is_declared(name, stage):
    paths = re.findall(r"--[\w-]+ ([^-\s]\S*)", stage["cmd"])
    known = declared(stage.get("deps")) + declared(stage.get("outs")) + declared(stage.get("metrics")) + \
        declared(stage.get("plots"))
    assert paths, stage["cmd"]
    for path in paths:  # a declared path, or a directory holding declared outputs
        assert path in known or any(Path(path) in Path(k).parents for k in known), \
            f"stage {name}: {path} is in the command but not in deps/outs/metrics"


def test_the_import_walk_finds_what_a_stage_uses():
    found = {str(p.relative_to(ROOT)) for p in project_imports("pipeline.train")}
    assert {"pipeline/train.py", "pipeline/common.py", "dddm/training.py", "dddm/methods/ict.py",
            "dddm/store.py" if (ROOT / "dddm/store.py").exists() else "dddm/store/__init__.py"} <= found


@pytest.mark.parametrize("name", ["prepare", "classifier", "reference"])
def test_the_data_stages_run_no_method_code(name):
    """Adding or changing a method (dddm/methods, the full params schema, the training's machinery) reruns no
    data stage: the scoring classifier, whose weights depend on the CPU that trains it, stays."""
    code = code_deps(re.findall(r"\bpipeline\.\w+", dict(stages())[name]["cmd"]))
    assert not {"dddm/methods", "dddm/config.py", "dddm/distributed.py", "dddm/training.py", "dddm/unet.py",
                "pipeline/common.py"} & set(code), code


def test_a_method_matrix_with_no_methods_is_no_flow_task(tmp_path):
    """`dvc repro finetune` with `finetune.methods: []` runs the whole pipeline: the flows leave it out."""
    from conftest import tiny_params, write_params
    from flows.dvcrun import stages

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    write_params(tmp_path, tiny_params(finetune={"methods": []}))
    assert stages(tmp_path) == ["check", "prepare", "classifier", "reference", "train", "sample", "score", "compare",
                                "register"]
    write_params(tmp_path, tiny_params())
    assert "finetune" in stages(tmp_path) and "score_finetuned" in stages(tmp_path)
