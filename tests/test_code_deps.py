"""dvc.yaml's code deps are complete by construction: each stage lists exactly the package
files it can import (its import closure, function-level imports included), so an edit to any
of them makes DVC rerun that stage, and an edit elsewhere does not."""

from __future__ import annotations

import ast
from pathlib import Path

from rlhf import stages
from rlhf.mlops import dag

REPO = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_closure(module: str) -> set[str]:
    """The `rlhf` files (relative to the repository) that importing `module` can load."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name.split(".")[0] != "rlhf" or name in seen or (path := _module_file(name)) is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        todo += list(_imported_names(path, name))
    return {path.relative_to(REPO).as_posix() for path in seen.values()}


def test_each_stage_depends_on_exactly_the_code_it_imports():
    declared = dag.read(REPO)
    for name, stage in declared.items():
        listed = {dep for dep in stage.deps if dep.startswith("rlhf/")}
        needed = import_closure(stages.info(name).module)
        assert listed == needed, (
            f"dvc.yaml stage {name}: add {sorted(needed - listed)}, "
            f"remove {sorted(listed - needed)} (python tests/test_code_deps.py rewrites them)")


def test_stage_registry_names_the_stages_of_dvc_yaml_in_order():
    assert tuple(dag.read(REPO)) == tuple(stages.REGISTRY)


def write_code_deps(dvc_yaml: Path = REPO / dag.DVC_YAML) -> None:
    """Rewrite each stage's `rlhf/` deps in dvc.yaml to its import closure (comments kept)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)
    document = yaml.load(dvc_yaml)
    for name, spec in document["stages"].items():
        others = [dep for dep in spec["deps"] if not str(dep).startswith("rlhf/")]
        spec["deps"] = sorted(import_closure(stages.info(name).module)) + others
    yaml.dump(document, dvc_yaml)


if __name__ == "__main__":  # python tests/test_code_deps.py: bring dvc.yaml up to date
    write_code_deps(REPO / dag.DVC_YAML)
