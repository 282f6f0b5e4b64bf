"""After a restart: adopt the sandboxes that still run, clean up after the rest."""

# mypy: disable-error-code="misc"
# (the mixin's `self` is the SandboxManager that composes it, a subclass, not a supertype)

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import procs
from ..agent.protocol import Frame
from ..errors import AgentKernelError, ProtocolError
from ..names import validate_sandbox_name
from . import records
from .common import _facts
from .containers import _sweep_containers
from .handles import AdoptingClient, Live

if TYPE_CHECKING:
    from .manager import SandboxManager
    from .store import SandboxRow


class RecoveryMixin:
    """SandboxManager's recovery (a mixin: the manager is `self`; manager.py composes them)."""

    def recover(self: SandboxManager) -> None:
        """Re-adopt persistent sandboxes that survived the previous daemon; clean up the rest.

        The database is first brought in line with the sandboxes' own records on disk (a
        damaged one was replaced by its backup or an empty one: see records.py).
        """
        from ..egress_forkserver import take_over

        self.recovered.extend(records.reconcile(self.store, self.root))
        # The egress gates' fork server a killed daemon left: its sandboxes (their
        # listeners, config, state) move to ours, so a second death of a fork server
        # does not close them (egress_forkserver._watch re-registers what we hold).
        self.recovered.extend(take_over())
        for eph in self.store.ephemerals():
            self._cleanup_dead(eph["name"], eph["backend"], eph["scratch"], eph["pid"],
                               eph["pid_start"], eph["helpers"])
            self.store.delete_ephemeral(eph["name"])
            self.recovered.append(f"cleaned up pool sandbox {eph['name']}")
        self._cleanup_unrecorded_pool()
        for row in self.store.sandboxes():
            try:  # a reboot unmounted them; a daemon restart did not
                self._attach_disk(row["name"], row["spec"])
            except AgentKernelError as exc:
                self.recovered.append(f"{row['name']}: {exc.message}")
        for row in self.store.sandboxes("running"):
            name = row["name"]
            if self._adopt(row):
                self.recovered.append(f"re-adopted {name}")
                continue
            self._mark_dead_stopped(name, row)
            self._audit(name, "sandbox_stopped", reason="found dead by a restarted daemon")
            self.recovered.append(f"marked {name} stopped (it died while no daemon ran)")
        for row in self.store.sandboxes("stopped"):
            self._cleanup_stopped(row)
        self.recovered.extend(_sweep_containers(
            {r["name"] for r in self.store.sandboxes()}))

    def _cleanup_unrecorded_pool(self: SandboxManager) -> None:
        """Pool sandboxes the database lost (damaged): their scratch dirs and cgroups.

        Only a daemon starts `pool-*` sandboxes, and only one daemon runs per runtime and
        data dir (the locks): any found now belong to a dead one.
        """
        from ..cgroups import scoped_names
        from ..paths import runtime_dir

        found = set(scoped_names("pool-"))
        with contextlib.suppress(OSError):
            found.update(p.name for p in (runtime_dir() / "sandboxes").glob("pool-*"))
        for name in sorted(found):
            with contextlib.suppress(AgentKernelError):
                validate_sandbox_name(name)
                backend = _scratch_owner(self._runtime_scratch(name))
                self._cleanup_dead(name, backend, str(self._runtime_scratch(name)), None, None,
                                   [])
                self.recovered.append(f"cleaned up unrecorded pool sandbox {name}")

    def _cleanup_stopped(self: SandboxManager, row: SandboxRow) -> None:
        """A sandbox recorded as stopped must have nothing running: a stale record (its
        start was not written down) leaves processes, a cgroup, a scratch dir. They go."""
        from ..cgroups import Cgroup

        name = row["name"]
        scratch = self._runtime_scratch(name)
        with contextlib.suppress(Exception):
            if scratch.exists() or any(_has_procs(d) for d in Cgroup.open(name).dirs):
                _shut_agent(scratch / "ctl" / "agent.sock")  # where no cgroup can kill it
                self._cleanup_dead(name, row["backend"], str(scratch), None, None, [])
                self.recovered.append(f"stopped what was left running of {name}")

    def _saved(self: SandboxManager, name: str) -> None:
        """Mirror a sandbox's row to its record on disk (after every change of the row)."""
        records.save_sandbox(self.store, name)

    def _adopt(self: SandboxManager, row: SandboxRow) -> bool:
        if not procs.alive(row["pid"], row["pid_start"]) or not row["scratch"]:
            return False
        sock = Path(row["scratch"]) / "ctl" / "agent.sock"
        running = self.store.detached_of(row["name"], running=True)
        # A microVM's agent notices a hang-up by polling its port: a connection made before
        # it did is no new session to it (no HELLO), but gets that session's frames. Keep
        # those of the detached commands, hang up and try again.
        timeouts = _facts(row["backend"]).adopt_hello_timeouts
        carried: dict[int, list[Frame]] = {}
        for attempt, timeout in enumerate(timeouts):
            client: AdoptingClient | None = None
            try:
                client = AdoptingClient.connect(sock, {int(r["chan"]) for r in running},
                                                orphans=carried)
                client.hello(timeout=timeout)
                break
            except (OSError, AgentKernelError):
                if client is not None:
                    client.close()
                    carried = client.take_orphans()
                if attempt + 1 == len(timeouts) or not procs.alive(row["pid"],
                                                                   row["pid_start"]):
                    return False
                time.sleep(0.2)
        assert client is not None
        live = Live(row["name"], row["backend"], client, Path(row["scratch"]), row["pid"],
                    row["pid_start"], row["helpers"])
        self._live[row["name"]] = live
        for r in running:
            execution = client.adopt(int(r["chan"]), int(r["pid"]))
            # Its EXIT may have gone to the dead daemon: the agent (1.3) says it again, or
            # that it knows no such command (the row then ends as failed).
            with contextlib.suppress(ProtocolError):
                execution.ask_ended()
            self._drain_detached(row["name"], r["id"], execution)
        self._audit(row["name"], "sandbox_adopted")
        return True

    def _cleanup_dead(self: SandboxManager, name: str, backend: str, scratch: str | None,
                      pid: int | None,
                      pid_start: int | None, helpers: list[Any]) -> None:
        """Remove whatever a sandbox whose owner died left on the host."""
        procs.kill(pid, pid_start)
        with contextlib.suppress(Exception):
            from ..cgroups import Cgroup

            Cgroup.open(name).destroy()
        for h in helpers:
            procs.kill(h[0], h[1] if len(h) > 1 else None)
        if scratch:
            path = Path(scratch)
            with contextlib.suppress(Exception):
                _facts(backend).cleanup_dead(name, path)
            procs.rmtree(path)


def _scratch_owner(scratch: Path) -> str:
    """The backend whose sandbox left `scratch` (the plainest one when none claims it)."""
    from ..backends import BACKEND_NAMES, backend_class, by_strength

    for name in BACKEND_NAMES:
        if backend_class(name).owns_scratch(scratch):
            return name
    return by_strength()[-1]


def _shut_agent(sock: Path) -> None:
    """Ask a persistent sandbox's agent to end it (best effort)."""
    if not sock.exists():
        return
    with contextlib.suppress(Exception):
        client = AdoptingClient.connect(sock, set(), timeout=2.0)
        try:
            client.hello(timeout=2.0)
            client.shutdown()
        finally:
            client.close()


def _has_procs(group_dir: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(p.read_text().strip() for p in group_dir.rglob("cgroup.procs"))
    return False
