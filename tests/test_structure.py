"""The package boundaries, read from the import graph (every import, also those inside
functions): the shared contracts import nothing else of tame; the roles import the shared
package and themselves, never each other, the orchestrator or the demo."""

import ast

import pytest

from tests.conftest import REPO

TAME = ("cluster", "actors", "learner", "reward_service")


def tame_imports(package: str) -> dict[str, set[str]]:
    """{file: modules of tame it imports} for every file of a package folder."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                # `from cluster import world` imports cluster.world
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        out[str(path.relative_to(REPO))] = {m for m in found if m.split(".")[0] in TAME}
    return out


def allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes) or module in ("cluster",)


def test_the_shared_package_imports_nothing_else_of_tame():
    graph = tame_imports("cluster/shared")
    assert len(graph) >= 7, graph
    bad = {f: sorted(m for m in mods if not allowed(m, ("cluster.shared",))) for f, mods in graph.items()}
    assert not any(bad.values()), bad


@pytest.mark.parametrize("role", ["actors", "learner", "reward_service"])
def test_a_role_imports_only_the_shared_package_and_itself(role):
    graph = tame_imports(role)
    # `from cluster.shared import x` also lists "cluster.shared.x": both are allowed.
    bad = {f: sorted(m for m in mods if not allowed(m, ("cluster.shared", role))) for f, mods in graph.items()}
    assert not any(bad.values()), bad
    assert any(m.startswith("cluster.shared") for mods in graph.values() for m in mods)


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The graph is read from the source: a lazy import of the orchestrator is found."""
    import tests.test_structure as me

    fake = tmp_path / "actors"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from cluster.controller import train\n")
    monkeypatch.setattr(me, "REPO", tmp_path)
    assert me.tame_imports("actors") == {"actors/x.py": {"cluster.controller", "cluster.controller.train"}}


def test_every_package_is_installed():
    """A non-editable install (`pip install '.[gpu]'` on a cluster image) ships exactly the
    packages pyproject.toml lists: every folder with an __init__.py must be among them."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in TAME for p in (REPO / top).rglob("__init__.py")}
    assert found == listed
