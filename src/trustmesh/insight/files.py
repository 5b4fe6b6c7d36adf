"""The file edge of recorded traffic: sidecar logs of a local mesh, Istio access-log files
and ``traffic export`` files are read here; everything else in this package is pure."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from trustmesh.insight.envoy_logs import from_istio_entry, from_trustmesh_entry
from trustmesh.insight.records import Problem, TrafficRecord
from trustmesh.insight.traffic import TrafficSet
from trustmesh.runtime.layout import Layout, read_json
from trustmesh.runtime.plan import MeshPlan

__all__ = ["istio_log_records", "mesh_log_records", "read_traffic"]

Progress = Callable[[int, int], None]


class StateError(Exception):
    """The state directory holds no mesh plan to read logs from."""


def _json_lines(path: Path) -> Iterator[tuple[int, object | Problem]]:
    """(line number, parsed object) for each line that is a JSON object; Envoy's own
    log lines (not starting with ``{``) are skipped, a broken JSON line is a Problem."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.startswith(b"{"):
                continue
            try:
                yield number, orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, Problem(f"{path}:{number}", "", f"not JSON: {exc.msg}")


def mesh_log_records(
    state: Path, progress: Progress | None = None
) -> Iterator[TrafficRecord | Problem]:
    """Every inbound record the sidecars of the mesh in ``state`` logged; ``progress`` is
    told (pods read, pods) as each sidecar's log is done."""
    layout = Layout(state)
    try:
        plan = MeshPlan.from_json(read_json(layout.plan))
    except FileNotFoundError:
        raise StateError(f"no mesh was started from {state} (trustmesh up DIR)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise StateError(f"cannot read the mesh plan in {state}: {exc}") from None
    workload_of_ip: dict[str, str] = {}
    for pod in plan.pods:
        for ip in (pod.pod_ip, pod.app_ip, pod.outbound_ip):
            if ip:
                workload_of_ip[ip] = pod.ref
    sidecars = [pod for pod in plan.pods if pod.sidecar]
    for done, pod in enumerate(sidecars):
        if progress is not None:
            progress(done, len(sidecars))
        log = layout.envoy_log_of(pod.key, plan.paths(pod))
        try:
            lines = list(_json_lines(log))
        except FileNotFoundError:
            continue  # never started: nothing recorded
        except OSError as exc:
            yield Problem(str(log), "", f"unreadable: {exc.strerror or exc}")
            continue
        for number, entry in lines:
            if isinstance(entry, Problem):
                yield entry
            elif isinstance(entry, dict):
                found = from_trustmesh_entry(entry, f"{log}:{number}", workload_of_ip)
                if found is not None:
                    yield found


def istio_log_records(path: Path, destination: str) -> Iterator[TrafficRecord | Problem]:
    """Records of one Istio sidecar's JSON access log (``kubectl logs POD -c istio-proxy``),
    the sidecar of ``destination`` (NS/NAME)."""
    try:
        lines = list(_json_lines(path))
    except OSError as exc:
        yield Problem(str(path), "", f"unreadable: {exc.strerror or exc}")
        return
    for number, entry in lines:
        if isinstance(entry, Problem):
            yield entry
        elif isinstance(entry, dict):
            found = from_istio_entry(entry, f"{path}:{number}", destination)
            if found is not None:
                yield found


def read_traffic(
    paths: Sequence[str], traffic: TrafficSet, progress: Progress | None = None
) -> list[Problem]:
    """Add every record of ``traffic export`` files to ``traffic``; unreadable files are
    returned as problems. ``progress`` is told (bytes read, total bytes) now and then."""
    unreadable: list[Problem] = []
    sizes = []
    for name in paths:
        try:
            sizes.append(Path(name).stat().st_size)
        except OSError:
            sizes.append(0)
    total, done = sum(sizes), 0
    for name, size in zip(paths, sizes, strict=True):
        try:
            with Path(name).open("rb") as handle:
                add = traffic.add_line
                for number, line in enumerate(handle, 1):
                    add(line, name, number)
                    if progress is not None and number % 65536 == 0:
                        progress(done + handle.tell(), total)
        except OSError as exc:
            unreadable.append(Problem(name, "", f"unreadable: {exc.strerror or exc}"))
        done += size
    if progress is not None:
        progress(total, total)
    return unreadable
