"""The import graph of src/agentkernel has no cycles and keeps its layering (read from the
source: module-level and lazy function-level imports alike)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from importgraph import cycles, graph, path_between


def test_no_import_cycles() -> None:
    edges = graph()
    found = cycles(edges)
    chains = [" -> ".join(path_between(edges, c[0], c[1]) or c) +
              " -> … -> " + c[0] for c in found]
    assert not found, "import cycles:\n" + "\n".join(chains)


def _reaches(edges: dict[str, set[str]], start: str, prefixes: tuple[str, ...]) -> list[str]:
    """Modules under `prefixes` that `start` imports, directly or not."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        for w in edges.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return sorted(m for m in seen if m.startswith(prefixes))


def test_nothing_but_the_entry_points_imports_the_cli() -> None:
    edges = graph()
    importers = sorted(m for m, targets in edges.items() if "agentkernel.cli" in targets)
    assert importers == ["agentkernel.__main__"], importers


# daemon/procs (pid liveness by start time) is a leaf the container engines use too; it
# leaves daemon/ when that package is split into the CLI's and the daemon's sides.
LAYERING_EXCEPTIONS = {"agentkernel.daemon.procs"}


def test_backends_never_reach_the_daemon_the_cli_or_http() -> None:
    edges = graph()
    for module in (m for m in edges if m.startswith("agentkernel.backends")):
        bad = _reaches(edges, module, ("agentkernel.daemon", "agentkernel.cli",
                                       "agentkernel.http", "agentkernel.planner"))
        bad = [m for m in bad if m not in LAYERING_EXCEPTIONS]
        assert not bad, f"{module} imports {bad}"


def test_the_planner_knows_no_front_door() -> None:
    """planner.py decides for every front door, so it imports none of them."""
    bad = _reaches(graph(), "agentkernel.planner",
                   ("agentkernel.daemon", "agentkernel.cli", "agentkernel.http",
                    "agentkernel.runcmd", "agentkernel.engine"))
    assert not [m for m in bad if m not in LAYERING_EXCEPTIONS], bad


def test_the_wire_context_imports_nothing_of_ours() -> None:
    """context.py is on the CLI's hot path: a leaf."""
    assert graph()["agentkernel.context"] == set()


def test_the_graph_sees_lazy_imports() -> None:
    """The checker itself: a function-level import is an edge (runcmd imports the engine
    only inside run_in_process)."""
    assert "agentkernel.engine" in graph()["agentkernel.runcmd"]
