"""Reading configuration from files, directories and stdin into a compiled mesh.

The one place (besides the CLI) that touches the file system for configuration:
api/ and policy/ receive bytes and return values.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from trustmesh.api.diagnostics import Diagnostic, Location, error
from trustmesh.api.loader import LoadResult, SourceCache, load_sources, validate_model
from trustmesh.api.policytest import Case, PolicyTestSpec
from trustmesh.api.resources import UnknownResource
from trustmesh.api.snapshot import ConfigSnapshot
from trustmesh.api.yamldoc import YamlDocument
from trustmesh.pipeline import compile_sources
from trustmesh.policy.compose import MeshPolicy
from trustmesh.yamlread import read_yaml

YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class PolicyTestFile:
    name: str
    location: Location
    spec: PolicyTestSpec
    document: YamlDocument = field(repr=False, compare=False)
    case_locations: tuple[Location, ...] = ()  # one per case: ``file:line spec.cases[i]``

    def located_cases(self) -> list[tuple[str, Case]]:
        """Each case with where it is written (``file:line spec.cases[i]``)."""
        where = [*map(str, self.case_locations)]
        where += [str(self.location)] * (len(self.spec.cases) - len(where))
        return list(zip(where, self.spec.cases, strict=True))


@dataclass(slots=True)
class LoadedConfig:
    snapshot: ConfigSnapshot
    diagnostics: list[Diagnostic]
    tests: list[PolicyTestFile]
    mesh: MeshPolicy | None = None
    helm_values: list[YamlDocument] = field(default_factory=list)
    unknown: list[UnknownResource] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]


def read_sources(
    paths: Iterable[str], stdin: BinaryIO | None = None
) -> tuple[list[tuple[str, bytes]], list[Diagnostic]]:
    """(name, bytes) for each file; directories are walked recursively in name order."""
    out: list[tuple[str, bytes]] = []
    problems: list[Diagnostic] = []
    for raw in paths:
        if raw == "-":
            stream = stdin if stdin is not None else sys.stdin.buffer
            out.append(("<stdin>", stream.read()))
            continue
        path = Path(raw)
        try:
            if path.is_dir():
                files = sorted(
                    (p for p in path.rglob("*") if p.is_file() and p.suffix in YAML_SUFFIXES),
                    key=lambda p: p.parts,  # Path's own order, without its slow __lt__
                )
                if not files:
                    problems.append(error("no-files", Location(raw), "no .yaml/.yml/.json files"))
                out.extend((str(p), p.read_bytes()) for p in files)
            else:
                out.append((raw, path.read_bytes()))
        except OSError as exc:
            problems.append(error("unreadable", Location(raw), exc.strerror or str(exc)))
    return out, problems


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Loading allocates millions of small acyclic objects (dicts, lists, strings): the
    cyclic garbage collector would rescan all of them again and again (a third of the
    time of a large load) and find nothing to free. It is paused for the load, and what
    is alive then is frozen (skipped by later collections: a full scan of a large config
    at the first allocation after the load costs as much again). A later load (a control
    plane reloading) first unfreezes and collects, so nothing stays out of reach."""
    was_enabled = gc.isenabled()
    if was_enabled and gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.enable()


def load_config(
    paths: Sequence[str],
    *,
    mesh_config: Sequence[str] = (),
    jwks_files: Mapping[str, str] | None = None,
    test_paths: Sequence[str] = (),
    stdin: BinaryIO | None = None,
    compile_policy: bool = True,
    source_cache: SourceCache | None = None,
    default_namespace: str = "default",
    assume_injected: bool = False,
    progress: Callable[[int, int], None] | None = None,
    preread: Sequence[tuple[str, bytes]] | None = None,
) -> LoadedConfig:
    """Load, validate and (when there are no errors) compile the configuration.

    ``source_cache`` keeps what each file loaded to between calls (a control plane
    reloading after one edit then parses only the edited file). ``default_namespace``
    is where objects without ``metadata.namespace`` go (kubectl's ``-n``);
    ``assume_injected`` treats workloads whose namespace is not among the inputs as
    injected instead of unknown. ``progress`` is told ``(read, total)`` in characters
    now and then while the files are read. ``preread``: the files of ``paths`` as
    :func:`read_sources` would return them, already in memory (a store's mirror): used
    instead of reading ``paths`` (none: the same "no-files" error)."""
    with _collector_paused():
        return _load_config(
            paths,
            mesh_config=mesh_config,
            jwks_files=jwks_files,
            test_paths=test_paths,
            stdin=stdin,
            compile_policy=compile_policy,
            source_cache=source_cache,
            default_namespace=default_namespace,
            assume_injected=assume_injected,
            progress=progress,
            preread=preread,
        )


def _load_config(
    paths: Sequence[str],
    *,
    mesh_config: Sequence[str],
    jwks_files: Mapping[str, str] | None,
    test_paths: Sequence[str],
    stdin: BinaryIO | None,
    compile_policy: bool,
    source_cache: SourceCache | None,
    default_namespace: str,
    assume_injected: bool,
    progress: Callable[[int, int], None] | None,
    preread: Sequence[tuple[str, bytes]] | None = None,
) -> LoadedConfig:
    if preread is None:
        sources, problems = read_sources(paths, stdin)
    else:
        sources, problems = list(preread), []
        if not sources:
            where = Location(paths[0] if paths else "<store>")
            problems.append(error("no-files", where, "no .yaml/.yml/.json files"))
    total = sum(len(data) for _, data in sources)
    mesh_sources, mesh_problems = read_sources(mesh_config)
    problems.extend(mesh_problems)
    jwks: dict[str, str] = {}
    for uri, file in (jwks_files or {}).items():
        try:
            jwks[uri] = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(error("unreadable", Location(file), f"jwks for {uri}: {exc}"))
    compiled = compile_sources(
        sources,
        mesh_config=mesh_sources,
        jwks=jwks,
        default_namespace=default_namespace,
        assume_injected=assume_injected,
        cache=source_cache,
        parse=read_yaml,
        progress=None if progress is None else (lambda done: progress(done, total)),
        compile_policy=compile_policy and not any(p.is_error for p in problems),
    )
    if source_cache is not None:
        source_cache.forget_unused()
    loaded = compiled.loaded
    test_sources, test_problems = read_sources(test_paths, stdin)
    # A test file inside a `-f` directory (or named twice) is loaded once: its tests are
    # already among the configuration's documents, and `test -f dir dir` is common.
    # (resolved only when there are test files: a control plane reloading a directory of
    # thousands of files has none, and resolving each costs a syscall per path component)
    seen = {_file_key(name) for name, _ in sources} if test_sources else set()
    unique_tests: list[tuple[str, bytes]] = []
    for name, data in test_sources:
        key = _file_key(name)
        if key not in seen:
            seen.add(key)
            unique_tests.append((name, data))
    tests_loaded = load_sources(unique_tests)
    diagnostics = problems + test_problems + list(compiled.diagnostics)
    tests = _tests(loaded, diagnostics) + _tests(tests_loaded, diagnostics)
    diagnostics.extend(tests_loaded.diagnostics)
    for r in tests_loaded.resources:
        diagnostics.append(
            error("not-a-test", r.meta_location(), f"{r.kind} in a test file: pass config with -f")
        )
    diagnostics.sort(key=Diagnostic.sort_key)
    result = LoadedConfig(
        compiled.snapshot,
        diagnostics,
        tests,
        helm_values=loaded.helm_values,
        unknown=loaded.unknown,
    )
    # Any error — in a test file too — means no compiled mesh, as a failed compile would.
    result.mesh = compiled.mesh if not result.errors else None
    return result


def _file_key(name: str) -> str:
    if name == "<stdin>":
        return name
    try:
        return str(Path(name).resolve())
    except OSError:
        return name


def _tests(loaded: LoadResult, diagnostics: list[Diagnostic]) -> list[PolicyTestFile]:
    out: list[PolicyTestFile] = []
    for document, base in loaded.test_documents:
        body: Any = document.body
        for part in base:
            body = body[part]
        if body.get("kind") != "PolicyTest":
            diagnostics.append(
                error(
                    "unknown-kind", document.location((*base, "kind")), "expected kind PolicyTest"
                )
            )
            continue
        meta = body.get("metadata") or {}
        name = meta.get("name", "?") if isinstance(meta, dict) else "?"
        spec, problems = validate_model(PolicyTestSpec, body.get("spec"), document, (*base, "spec"))
        diagnostics.extend(problems)
        if spec is not None:
            cases = tuple(
                document.location((*base, "spec", "cases", i)) for i in range(len(spec.cases))
            )
            out.append(PolicyTestFile(str(name), document.location(base), spec, document, cases))
    return out
