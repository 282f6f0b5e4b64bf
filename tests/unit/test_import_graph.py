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


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_nothing_but_the_entry_points_imports_the_cli() -> None:
    edges = graph()
    importers = sorted(m for m, targets in edges.items() if not _in(m, "agentkernel.cli")
                       and any(_in(t, "agentkernel.cli") for t in targets))
    assert importers == ["agentkernel.__main__"], importers


LAYERING_EXCEPTIONS: set[str] = set()


def test_backends_never_reach_the_daemon_the_cli_or_http() -> None:
    edges = graph()
    for module in (m for m in edges if m.startswith("agentkernel.backends")):
        bad = _reaches(edges, module, ("agentkernel.daemon", "agentkernel.cli",
                                       "agentkernel.ipc", "agentkernel.http",
                                       "agentkernel.mcpserver", "agentkernel.planner"))
        bad = [m for m in bad if m not in LAYERING_EXCEPTIONS]
        assert not bad, f"{module} imports {bad}"


def test_the_daemons_side_never_reaches_the_clis_side() -> None:
    """daemon/ is the daemon process only; what both sides share (the socket codec and
    client) is in ipc/, which the daemon may use and the CLI does."""
    edges = graph()
    for module in (m for m in edges if _in(m, "agentkernel.daemon")):
        bad = _reaches(edges, module, ("agentkernel.cli",))
        assert not bad, f"{module} imports {bad}"


def test_ipc_is_a_leaf_of_the_daemons_protocol() -> None:
    """The socket client and codec know no side: no daemon, CLI, HTTP or planner, and
    the codec (on every hot-path call) nothing of ours at all."""
    edges = graph()
    for module in (m for m in edges if _in(m, "agentkernel.ipc")):
        bad = _reaches(edges, module, ("agentkernel.daemon", "agentkernel.cli",
                                       "agentkernel.http", "agentkernel.mcpserver",
                                       "agentkernel.planner", "agentkernel.engine"))
        assert not bad, f"{module} imports {bad}"
    assert edges["agentkernel.ipc.wire"] == set()


# Where a front door may touch daemon/ directly: its service interface (the protocol and
# the request/result types). `agentkernel daemon start --foreground` and `serve` with no
# daemon up make this process the daemon, so that one CLI module starts the server.
FRONT_DOORS = ("agentkernel.cli", "agentkernel.http", "agentkernel.mcpserver")
SERVICE_INTERFACE = {"agentkernel.daemon", "agentkernel.daemon.api"}
BECOMES_THE_DAEMON = {("agentkernel.cli.daemon", "agentkernel.daemon.server")}


def test_front_doors_reach_the_daemon_only_through_the_client_or_the_service() -> None:
    edges = graph()
    for module in (m for m in edges if any(_in(m, door) for door in FRONT_DOORS)):
        bad = sorted(t for t in edges[module] if _in(t, "agentkernel.daemon")
                     and t not in SERVICE_INTERFACE and (module, t) not in BECOMES_THE_DAEMON)
        assert not bad, f"{module} imports {bad} (use ipc.client or daemon.api)"


def test_the_cli_reaches_the_daemon_process_only_to_become_it() -> None:
    """Besides cli/daemon.py, no CLI module pulls in the manager, pool or server, even
    indirectly (they talk to the daemon over ipc.client)."""
    edges = graph()
    for module in (m for m in edges if _in(m, "agentkernel.cli") and m != "agentkernel.cli"
                   and m != "agentkernel.cli.daemon"):
        bad = [m for m in _reaches(edges, module, ("agentkernel.daemon.",))
               if m not in SERVICE_INTERFACE]
        assert not bad, f"{module} imports {bad}"


def test_the_planner_knows_no_front_door() -> None:
    """planner.py decides for every front door, so it imports none of them."""
    bad = _reaches(graph(), "agentkernel.planner",
                   ("agentkernel.daemon", "agentkernel.cli", "agentkernel.http",
                    "agentkernel.engine"))
    assert not [m for m in bad if m not in LAYERING_EXCEPTIONS], bad


def test_the_wire_context_imports_nothing_of_ours() -> None:
    """context.py is on the CLI's hot path: a leaf."""
    assert graph()["agentkernel.context"] == set()


def test_the_graph_sees_lazy_imports() -> None:
    """The checker itself: a function-level import is an edge (cli/run imports the engine
    only inside run_in_process)."""
    assert "agentkernel.engine" in graph()["agentkernel.cli.run"]
