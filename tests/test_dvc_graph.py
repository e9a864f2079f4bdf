"""dvc.yaml is the one description of the stage graph: every project module a stage imports is among
its deps, and every path its command reads or writes is a declared dep or output."""

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


@pytest.mark.parametrize("name, stage", stages(), ids=[n for n, _ in stages()])
def test_every_imported_project_module_is_a_dependency(name, stage):
    modules = re.findall(r"\bpipeline\.\w+", stage["cmd"])  # the stage's, and the worker module a launcher runs
    deps = [ROOT / d for d in declared(stage["deps"])]
    missing = [str(f.relative_to(ROOT)) for f in sorted(set().union(*map(project_imports, modules)))
               if not any(f == d or d in f.parents for d in deps)]
    assert not missing, f"stage {name} imports {missing} but does not depend on them"


@pytest.mark.parametrize("name, stage", stages(), ids=[n for n, _ in stages()])
def test_every_path_in_the_command_is_declared(name, stage):
    paths = re.findall(r"--(?!method )[\w-]+ ([^-\s]\S*)", stage["cmd"])
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
