"""`trustmesh apply -f`, `get`, `delete`: kubectl's verbs against a store (etcd or files).

Thin: validation is `trustmesh validate`'s (config.load_config), the store does the rest.
Nothing is written unless every input is valid, and an apply is one commit: all of it or
none of it (one etcd transaction).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from trustmesh.api.diagnostics import Diagnostic, error
from trustmesh.api.resources import Resource
from trustmesh.cli.options import NamespaceOpt, namespace_problem
from trustmesh.config import load_config
from trustmesh.store import ResourceStore, StoreError, open_store
from trustmesh.store.apply import apply_resources, resource_key
from trustmesh.store.etcd_client import TLS_ENV, EtcdTls
from trustmesh.store.model import (
    ResourceDelete,
    ResourceKey,
    StoredResource,
    is_object_name,
)

T = TypeVar("T")
DEFAULT_STORE = "file:trustmesh-store"

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="https://HOST:PORT[,HOST:PORT...] (etcd with TLS: --etcd-*file), "
        "etcd://HOST:PORT[,...] (plaintext etcd) or file:DIR (a directory `trustmesh up DIR` "
        "reads); default file:trustmesh-store.",
        envvar="TRUSTMESH_STORE",
    ),
]
CaFileOpt = Annotated[
    Path | None,
    typer.Option("--etcd-cafile", help="The etcd CA (PEM) for https://.", envvar=TLS_ENV[0]),
]
CertFileOpt = Annotated[
    Path | None,
    typer.Option("--etcd-certfile", help="Client certificate for etcd (PEM).", envvar=TLS_ENV[1]),
]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option("--etcd-keyfile", help="Its key (PEM).", envvar=TLS_ENV[2]),
]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state",
        help="The state directory of `up --hosts`: its store and operator certificate.",
    ),
]


@dataclass(frozen=True, slots=True)
class StoreTarget:
    url: str
    tls: EtcdTls | None


def store_target(
    store: str | None,
    cafile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    state: Path | None = None,
) -> StoreTarget:
    """Where to read and write: --state (the mesh's own store and operator certificate),
    else --store with --etcd-*file; an error names the flag."""
    try:
        tls = EtcdTls.from_options(cafile, certfile, keyfile)
    except StoreError as exc:
        raise _fail(str(exc), 2) from None
    if state is not None:
        if store is not None or tls is not None:
            raise _fail("--state names the store and its certificate: drop --store/--etcd-*", 2)
        from trustmesh.runtime.cluster import store_of

        try:
            url, found = store_of(state)
        except StoreError as exc:
            raise _fail(str(exc), 2) from None
        return StoreTarget(url, found)
    url = store or DEFAULT_STORE
    if tls is not None and url.startswith("file:"):
        raise _fail("--etcd-cafile/--etcd-certfile/--etcd-keyfile are for an etcd --store", 2)
    return StoreTarget(url, tls)


FilesOpt = Annotated[
    list[str] | None,
    typer.Option("-f", "--filename", help="YAML file, directory (recursive) or - for stdin."),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _run(target: StoreTarget, action: Callable[[ResourceStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = open_store(target.url, target.tls)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except StoreError as exc:
        raise _fail(str(exc)) from None


# --- reading the input -----------------------------------------------------------------------


def _validated(files: Sequence[str], namespace: str) -> list[Resource[Any]]:
    """The objects of ``files`` if they pass `trustmesh validate`; else print why and exit."""
    if not files:
        raise _fail("-f FILE is required", 2)
    loaded = load_config(files, compile_policy=False, default_namespace=namespace)
    problems: list[Diagnostic] = list(loaded.errors)
    for unknown in loaded.unknown:
        problems.append(
            error(
                "unknown-kind",
                unknown.location,
                f"{unknown.kind} ({unknown.api_version}) is not a kind trustmesh stores",
            )
        )
    for test in loaded.tests:
        problems.append(
            error("not-stored", test.location, "PolicyTest is not stored: run it with `test`")
        )
    for values in loaded.helm_values:
        problems.append(error("not-stored", values.location(()), "Helm values are not stored"))
    for resource in loaded.snapshot.resources:
        problems.extend(_name_problems(resource))
        metadata = _metadata_version(resource)
        if metadata is not None and not metadata.isdigit():
            problems.append(
                error(
                    "bad-resource-version",
                    resource.meta_location("resourceVersion"),
                    "metadata.resourceVersion must be a number as `get` prints it",
                )
            )
    if problems:
        for problem in sorted(problems, key=Diagnostic.sort_key):
            typer.echo(str(problem), err=True)
        raise _fail(f"{len(problems)} error(s): nothing was written")
    return sorted(loaded.snapshot.resources, key=lambda r: r.order)


def _name_problems(resource: Resource[Any]) -> list[Diagnostic]:
    """The API server's name rules (the store's keys and file names rely on them)."""
    out: list[Diagnostic] = []
    label_only = resource.kind in ("Namespace", "Service")
    if not is_object_name(resource.name, label_only=label_only):
        rule = "a DNS-1123 label" if label_only else "a DNS-1123 subdomain"
        allowed = "'-'" if label_only else "'-', '.'"
        out.append(
            error(
                "invalid-name",
                resource.meta_location("name"),
                f"{resource.name!r} is not {rule} (lower-case letters, digits, {allowed};"
                " starts and ends alphanumeric)",
            )
        )
    if resource.namespace and not is_object_name(resource.namespace, label_only=True):
        out.append(
            error(
                "invalid-namespace",
                resource.meta_location("namespace"),
                f"{resource.namespace!r} is not a namespace name (a DNS-1123 label)",
            )
        )
    return out


def _metadata_version(resource: Resource[Any]) -> str | None:
    body: Any = resource.document.body
    for part in resource.base_path:
        body = body[part]
    metadata = body.get("metadata") if isinstance(body, dict) else None
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    return None if version is None else str(version)


# --- apply -------------------------------------------------------------------------------------


def apply(
    filename: FilesOpt = None,
    namespace: NamespaceOpt = "default",
    store: StoreOpt = None,
    etcd_cafile: CaFileOpt = None,
    etcd_certfile: CertFileOpt = None,
    etcd_keyfile: KeyFileOpt = None,
    state: StateOpt = None,
) -> None:
    """Validate (as `validate`) and write objects to the store, all or nothing."""
    problem = namespace_problem(namespace)
    if problem:
        raise _fail(problem, 2)
    target = store_target(store, etcd_cafile, etcd_certfile, etcd_keyfile, state)
    resources = _validated(filename or [], namespace)
    try:
        outcome = _run(target, lambda s: apply_resources(s, resources))
    except typer.Exit:
        typer.echo("nothing was written", err=True)
        raise
    for key, what in outcome:
        typer.echo(f"{key.display()} {what}")


# --- get ---------------------------------------------------------------------------------------


# Istio's CRD short names (and the core kinds') as kubectl knows them.
SHORT_NAMES = {
    "ap": "authorizationpolicy",
    "pa": "peerauthentication",
    "ra": "requestauthentication",
    "dr": "destinationrule",
    "vs": "virtualservice",
    "se": "serviceentry",
    "gw": "gateway",
    "we": "workloadentry",
    "wg": "workloadgroup",
    "svc": "service",
    "ns": "namespace",
    "po": "pod",
    "deploy": "deployment",
    "sa": "serviceaccount",
    "cm": "configmap",
}


def _kind_matches(query: str, key: ResourceKey) -> bool:
    """kubectl's names for a kind: Kind, kind, kinds, kind.group, short names (ap, pa…)."""
    query = query.lower()
    kind, _, group = query.partition(".")
    kind = SHORT_NAMES.get(kind, kind)
    if group and group != key.group.lower():
        return False
    singular = key.kind.lower()
    plural = singular[:-1] + "ies" if singular.endswith("y") else singular + "s"
    return kind in (singular, plural) or (kind == "all")


def _as_output(items: list[StoredResource], single: bool, output: str) -> str:
    bodies = [r.body() for r in items]
    value: dict[str, Any] = (
        bodies[0] if single else {"apiVersion": "v1", "kind": "List", "items": bodies}
    )
    if output == "json":
        return json.dumps(value, indent=2) + "\n"
    return str(yaml.safe_dump(value, sort_keys=False))


def get(
    kind: Annotated[str, typer.Argument(help="Kind: authorizationpolicy, peerauthentications, …")],
    name: Annotated[str | None, typer.Argument(help="Object name.")] = None,
    namespace: NamespaceOpt = "default",
    all_namespaces: Annotated[
        bool, typer.Option("-A", "--all-namespaces", help="Every namespace.")
    ] = False,
    output: Annotated[str, typer.Option("-o", "--output", help="table, yaml or json")] = "table",
    store: StoreOpt = None,
    etcd_cafile: CaFileOpt = None,
    etcd_certfile: CertFileOpt = None,
    etcd_keyfile: KeyFileOpt = None,
    state: StateOpt = None,
) -> None:
    """Print objects from the store; -o yaml|json output can be applied again."""
    if output not in ("table", "yaml", "json"):
        raise _fail(f"-o must be table, yaml or json, got {output!r}", 2)
    target = store_target(store, etcd_cafile, etcd_certfile, etcd_keyfile, state)
    listed, _ = _run(target, lambda s: s.list())
    items = [
        r
        for r in listed
        if _kind_matches(kind, r.key)
        and (all_namespaces or r.key.namespace in (namespace, ""))
        and (name is None or r.key.name == name)
    ]
    if name is not None and not items:
        raise _fail(f'{kind} "{name}" not found in namespace {namespace}')
    if output != "table":
        sys.stdout.write(_as_output(items, name is not None, output))
        return
    if not items:
        where = "" if all_namespaces else f" in {namespace} namespace"
        typer.echo(f"No resources found{where}.", err=True)
        return
    rows = [("NAMESPACE", "KIND", "NAME", "RESOURCE VERSION")]
    rows += [
        (r.key.namespace, r.key.display().split("/")[0], r.key.name, str(r.resource_version))
        for r in items
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# --- delete ------------------------------------------------------------------------------------


def delete(
    kind: Annotated[str | None, typer.Argument(help="Kind (with NAME), or use -f.")] = None,
    name: Annotated[str | None, typer.Argument(help="Object name.")] = None,
    filename: FilesOpt = None,
    namespace: NamespaceOpt = "default",
    store: StoreOpt = None,
    etcd_cafile: CaFileOpt = None,
    etcd_certfile: CertFileOpt = None,
    etcd_keyfile: KeyFileOpt = None,
    state: StateOpt = None,
) -> None:
    """Delete the objects named in -f files, or KIND NAME; all or nothing."""
    if bool(filename) == bool(kind):
        raise _fail("give either -f FILE or KIND NAME", 2)
    if kind is not None and name is None:
        raise _fail("KIND needs a NAME", 2)
    target = store_target(store, etcd_cafile, etcd_certfile, etcd_keyfile, state)

    async def action(s: ResourceStore) -> list[StoredResource]:
        listed, _ = await s.list()
        if filename:
            wanted = {resource_key(r) for r in _validated(filename, namespace)}
            targets = [r for r in listed if r.key in wanted]
            missing = wanted - {r.key for r in targets}
        else:
            assert kind is not None
            targets = [
                r
                for r in listed
                if _kind_matches(kind, r.key)
                and r.key.name == name
                and r.key.namespace in (namespace, "")
            ]
            missing = set() if targets else {ResourceKey("", kind, namespace, name or "")}
        if missing:
            names = ", ".join(sorted(f"{k.display()} in {k.namespace}" for k in missing))
            raise StoreError(f"not found: {names}; nothing was deleted")
        await s.commit([], [ResourceDelete(r.key, r.resource_version) for r in targets])
        return targets

    for deleted in _run(target, action):
        typer.echo(f"{deleted.key.display()} deleted")


__all__ = ["apply", "delete", "get"]
