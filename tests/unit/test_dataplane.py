"""How each workload meets the mesh: Istio's injection webhook + injectRequired, live pod
dumps, host network, gateways, ambient enrolment, and namespaces the input does not hold."""

from __future__ import annotations

import pytest

from trustmesh.api.dataplane import MeshMode
from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import ConfigSnapshot, build_snapshot


def snapshot(
    text: str, *, assume_injected: bool = False, namespace: str = "default"
) -> ConfigSnapshot:
    loaded = load_sources([("in.yaml", text.encode())], namespace)
    assert not loaded.errors, loaded.errors
    return build_snapshot(loaded, assume_injected=assume_injected)


def namespace(name: str, labels: str = "") -> str:
    return (
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n---\n"
    )


def deployment(name: str, ns: str, labels: str = "", annotations: str = "", spec: str = "") -> str:
    return f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  template:
    metadata:
      labels: {{app: {name}{", " + labels if labels else ""}}}
      annotations: {{{annotations}}}
    spec: {{containers: [{{name: app, image: app}}]{", " + spec if spec else ""}}}
---
"""


def modes(snap: ConfigSnapshot) -> dict[str, str]:
    return {w.ref: w.dataplane.mode.value for w in snap.workloads}


# The webhook selectors of istio-discovery's mutatingwebhook.yaml, then injectRequired.
CASES = [
    # (namespace labels, pod labels, pod annotations, expected mode)
    ("istio-injection: enabled", "", "", "sidecar"),
    ("istio-injection: disabled", "sidecar.istio.io/inject: 'true'", "", "none"),
    ("istio-injection: 'true'", "", "", "none"),  # only "enabled" selects the namespace
    ("istio-injection: enabled", "sidecar.istio.io/inject: 'false'", "", "none"),
    ("istio-injection: enabled", "", "sidecar.istio.io/inject: 'false'", "none"),
    # The label beats the annotation.
    (
        "istio-injection: enabled",
        "sidecar.istio.io/inject: 'true'",
        "sidecar.istio.io/inject: 'false'",
        "sidecar",
    ),
    ("istio.io/rev: canary", "", "", "sidecar"),
    ("istio.io/rev: canary", "sidecar.istio.io/inject: 'false'", "", "none"),
    # istio-injection takes precedence over istio.io/rev: "disabled" means no injector at all.
    ("'istio.io/rev': canary, istio-injection: disabled", "", "", "none"),
    ("", "sidecar.istio.io/inject: 'true'", "", "sidecar"),
    ("", "istio.io/rev: canary", "", "sidecar"),
    ("", "istio.io/rev: canary, sidecar.istio.io/inject: 'false'", "", "none"),
    # objectSelector reads labels only: the annotation alone selects nothing.
    ("", "", "sidecar.istio.io/inject: 'true'", "none"),
    ("", "", "", "none"),
]


@pytest.mark.parametrize(("ns_labels", "labels", "annotations", "expected"), CASES)
def test_injection_follows_istios_webhook_and_inject_required(
    ns_labels: str, labels: str, annotations: str, expected: str
) -> None:
    snap = snapshot(namespace("app", ns_labels) + deployment("web", "app", labels, annotations))
    workload = snap.workload("app/web")
    assert workload is not None
    assert workload.dataplane.mode.value == expected, workload.dataplane.reason
    assert workload.has_sidecar is (expected == "sidecar")
    assert not workload.dataplane.uncertain


def test_host_network_and_system_namespaces_are_never_injected() -> None:
    text = (
        namespace("app", "istio-injection: enabled")
        + namespace("kube-system", "istio-injection: enabled")
        + deployment("hostnet", "app", spec="hostNetwork: true")
        + deployment("dns", "kube-system")
    )
    snap = snapshot(text)
    assert modes(snap) == {"app/hostnet": "none", "kube-system/dns": "none"}
    assert "hostNetwork" in snap.workload("app/hostnet").dataplane.reason  # type: ignore[union-attr]


LIVE_POD = """apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: app
  uid: 5b1c0a52-1f0e-4d7e-9d3c-%s
  resourceVersion: "4711"
  labels: {app: %s}
spec:
  containers: %s
status: {phase: Running, podIP: 10.244.0.%s}
---
"""


def test_a_running_pod_is_injected_only_if_it_has_an_istio_proxy_container() -> None:
    text = (
        namespace("app", "istio-injection: enabled")
        + LIVE_POD % ("old", "000000000001", "old", "[{name: app}]", "7")
        + LIVE_POD % ("new", "000000000002", "new", "[{name: app}, {name: istio-proxy}]", "8")
        + LIVE_POD
        % (
            "native",
            "000000000003",
            "native",
            "[{name: app}]\n  initContainers: [{name: istio-proxy, restartPolicy: Always}]",
            "9",
        )
    )
    snap = snapshot(text)
    assert modes(snap) == {"app/old": "none", "app/new": "sidecar", "app/native": "sidecar"}
    assert "running Pod" in snap.workload("app/old").dataplane.reason  # type: ignore[union-attr]


def test_a_manifest_pod_follows_the_namespace_not_its_missing_proxy() -> None:
    text = namespace("app", "istio-injection: enabled") + (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: app}\n"
        "spec: {containers: [{name: app}]}\n"
    )
    assert modes(snapshot(text)) == {"app/p": "sidecar"}


GATEWAYS = """apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  template:
    metadata:
      labels: {app: istio-ingressgateway, istio: ingressgateway}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      containers:
      - name: istio-proxy
        args: [proxy, router, --domain, $(POD_NAMESPACE).svc.cluster.local]
        ports: [{containerPort: 8080}, {containerPort: 8443}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ingress, namespace: gw}
spec:
  template:
    metadata:
      labels: {app: ingress, sidecar.istio.io/inject: "true"}
      annotations: {inject.istio.io/templates: gateway}
    spec: {containers: [{name: istio-proxy, image: auto}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: waypoint, namespace: gw}
spec:
  template:
    metadata:
      labels: {gateway.istio.io/managed: istio.io-mesh-controller, istio.io/gateway-name: waypoint}
    spec: {containers: [{name: istio-proxy}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: router
  namespace: gw
  uid: 0a
  labels: {app: router}
spec: {containers: [{name: istio-proxy, args: [proxy, router]}]}
status: {phase: Running}
"""


def test_gateway_pods_are_gateways_not_sidecars() -> None:
    text = namespace("istio-system") + namespace("gw", "istio-injection: enabled") + GATEWAYS
    snap = snapshot(text)
    assert set(modes(snap).values()) == {"gateway"}
    assert not any(w.has_sidecar for w in snap.workloads)
    assert all(w.dataplane.has_mesh_identity for w in snap.workloads)


AMBIENT = [
    # (namespace labels, pod labels, expected)
    ("istio.io/dataplane-mode: ambient", "", "ambient"),
    ("istio.io/dataplane-mode: ambient", "istio.io/dataplane-mode: none", "none"),
    ("", "istio.io/dataplane-mode: ambient", "ambient"),
    # A sidecar takes precedence: istio-cni skips pods that have one.
    ("istio.io/dataplane-mode: ambient, istio-injection: enabled", "", "sidecar"),
]


@pytest.mark.parametrize(("ns_labels", "labels", "expected"), AMBIENT)
def test_ambient_enrolment_follows_istio_cnis_default_selectors(
    ns_labels: str, labels: str, expected: str
) -> None:
    snap = snapshot(namespace("app", ns_labels) + deployment("web", "app", labels))
    assert modes(snap) == {"app/web": expected}


def test_a_pod_that_asks_for_a_sidecar_in_an_ambient_namespace_gets_one() -> None:
    # The object webhook selects it (namespace without istio-injection / istio.io/rev),
    # then istio-cni skips the pod because it has a sidecar.
    text = namespace("app", "istio.io/dataplane-mode: ambient") + deployment(
        "web", "app", "sidecar.istio.io/inject: 'true'"
    )
    assert modes(snapshot(text)) == {"app/web": "sidecar"}


def test_ambient_host_network_pods_are_not_enrolled_and_waypoints_are_recorded() -> None:
    text = (
        namespace("app", "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp")
        + deployment("hostnet", "app", spec="hostNetwork: true")
        + deployment("web", "app")
        + deployment("direct", "app", "istio.io/use-waypoint: none")
    )
    snap = snapshot(text)
    assert modes(snap) == {"app/hostnet": "none", "app/web": "ambient", "app/direct": "ambient"}
    assert snap.workload("app/web").dataplane.waypoint == "wp"  # type: ignore[union-attr]
    assert snap.workload("app/direct").dataplane.waypoint is None  # type: ignore[union-attr]


def test_a_running_ambient_pod_is_known_by_its_redirection_annotation() -> None:
    text = (
        namespace("app", "istio.io/dataplane-mode: ambient")
        + LIVE_POD.replace(
            "labels: {app: %s}",
            "labels: {app: %s}\n  annotations: {ambient.istio.io/redirection: enabled}",
        )
        % ("in", "0000000000a1", "in", "[{name: app}]", "3")
        + LIVE_POD % ("out", "0000000000a2", "out", "[{name: app}]", "4")
    )
    assert modes(snapshot(text)) == {"app/in": "ambient", "app/out": "none"}


BOOKINFO_LIKE = """apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-details}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: details-v1, labels: {app: details}}
spec:
  template:
    metadata: {labels: {app: details, version: v1}}
    spec:
      serviceAccountName: bookinfo-details
      containers:
      - name: details
        image: docker.io/istio/examples-bookinfo-details-v1:1.20.3
        ports: [{containerPort: 9080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: opted-out}
spec:
  template:
    metadata: {labels: {app: opted-out, sidecar.istio.io/inject: "false"}}
    spec: {containers: [{name: app}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: asks}
spec:
  template:
    metadata: {labels: {app: asks, sidecar.istio.io/inject: "true"}}
    spec: {containers: [{name: app}]}
"""


def test_without_namespace_objects_injection_is_unknown_unless_assumed() -> None:
    unknown = snapshot(BOOKINFO_LIKE)
    assert modes(unknown) == {
        "default/details-v1": "unknown",
        "default/opted-out": "none",  # a pod-level "false" decides whatever the namespace says
        "default/asks": "sidecar",  # injected unless the namespace disables injection...
    }
    asks = unknown.workload("default/asks")
    assert asks is not None and asks.dataplane.assumed  # ...which the input cannot show
    details = unknown.workload("default/details-v1")
    assert details is not None and not details.has_sidecar and details.dataplane.uncertain
    assert "namespace default is not among the inputs" in details.dataplane.reason

    assumed = snapshot(BOOKINFO_LIKE, assume_injected=True)
    assert modes(assumed) == {
        "default/details-v1": "sidecar",
        "default/opted-out": "none",
        "default/asks": "sidecar",
    }
    details = assumed.workload("default/details-v1")
    assert details is not None and details.has_sidecar and details.dataplane.assumed

    # -n puts objects without a namespace where kubectl -n would.
    elsewhere = snapshot(
        namespace("shop", "istio-injection: enabled") + BOOKINFO_LIKE, namespace="shop"
    )
    assert modes(elsewhere) == {
        "shop/details-v1": "sidecar",
        "shop/opted-out": "none",
        "shop/asks": "sidecar",
    }
    assert not any(w.dataplane.uncertain for w in elsewhere.workloads)


def test_injector_settings_from_helm_values() -> None:
    values = """global:
  proxy: {autoInject: disabled}
sidecarInjectorWebhook:
  neverInjectSelector:
  - matchExpressions: [{key: legacy, operator: Exists}]
---
"""
    text = (
        values
        + namespace("app", "istio-injection: enabled")
        + deployment("plain", "app")
        + deployment("asks", "app", "sidecar.istio.io/inject: 'true'")
    )
    assert modes(snapshot(text)) == {"app/plain": "none", "app/asks": "sidecar"}
    never = """sidecarInjectorWebhook:
  enableNamespacesByDefault: true
  neverInjectSelector:
  - matchExpressions: [{key: legacy, operator: Exists}]
---
"""
    text = (
        never
        + namespace("app")
        + deployment("plain", "app")
        + deployment("legacy", "app", "legacy: 'yes'")
    )
    assert modes(snapshot(text)) == {"app/plain": "sidecar", "app/legacy": "none"}


def test_workload_entries_keep_their_sidecar() -> None:
    text = namespace("vm") + (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: vm1, namespace: vm}\nspec: {address: 10.0.0.9, labels: {app: vm}}\n"
    )
    assert MeshMode.SIDECAR.value == modes(snapshot(text))["vm/vm1"]


def test_a_controller_of_unknown_injection_follows_its_running_pods() -> None:
    # `kubectl get all -o yaml` holds Deployments and Pods but no Namespace objects.
    pods = "".join(
        LIVE_POD.replace("labels: {app: %s}", "labels: {app: %s, pod-template-hash: 6d5f}")
        % (f"web-6d5f-{i}", f"00000000000{i}", "web", "[{name: web}, {name: istio-proxy}]", i)
        for i in (1, 2)
    )
    text = deployment("web", "app") + pods + deployment("batch", "app")
    snap = snapshot(text)
    web = snap.workload("app/web")
    assert web is not None and web.has_sidecar and not web.dataplane.uncertain
    assert "running pods (app/web-6d5f-1, app/web-6d5f-2)" in web.dataplane.reason
    assert modes(snap)["app/batch"] == "unknown"  # no running pod tells
