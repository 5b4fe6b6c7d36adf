"""What a pod's container runs (known images, --image mappings, errors with their lines),
how the kubelet's restart policy and back-off decide restarts, and how a not-ready pod's
endpoints leave the proxies' clusters (pure parts; the processes are in tests/e2e)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.meshutil import ROOT
from trustmesh.api.snapshot import build_snapshot
from trustmesh.cli.main import app
from trustmesh.config import load_config, load_sources
from trustmesh.runtime.commands import ImageCommand, parse_image_command
from trustmesh.runtime.plan import MeshPlan, PodPlan, plan_mesh
from trustmesh.runtime.restarts import Backoff, Exit, should_restart
from trustmesh.samples.images import image_matches, parse_image, stand_in_for
from trustmesh.xds.readiness import EndpointFilter

BOOKINFO = ROOT / "examples" / "bookinfo"


def _plan_text(text: str, images: tuple[ImageCommand, ...] = ()):  # type: ignore[no-untyped-def]
    return plan_mesh(
        build_snapshot(load_sources([("pods.yaml", text.encode())]), ()), images=images
    )


def _deployment(container: str, name: str = "web") -> str:
    return f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: shop}}
spec:
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - name: {name}
{container}"""


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/istio/examples-bookinfo-reviews-v2:1.20.3",
        "istio/examples-bookinfo-reviews-v2",
        "gcr.io/istio-release/examples-bookinfo-reviews-v2:1.18.0",
        "registry.istio.io/release/examples-bookinfo-reviews-v2:1.20.3",
        "localhost:5000/examples-bookinfo-reviews-v2@sha256:0123abcd",
    ],
)
def test_istio_images_are_known_whatever_their_registry_owner_and_tag(image: str) -> None:
    stand_in = stand_in_for(image)
    assert stand_in is not None and stand_in.sample == "reviews"
    assert dict(stand_in.env) == {
        "SERVICE_VERSION": "v2",
        "ENABLE_RATINGS": "true",
        "STAR_COLOR": "black",
    }
    assert stand_in.command() == ("trustmesh", "sample", "reviews", "--port=9080")


def test_image_references_parse_as_docker_parses_them() -> None:
    assert parse_image("nginx") == parse_image("docker.io/library/nginx")
    ref = parse_image("localhost:5000/team/app:1.2@sha256:ab")
    assert (ref.registry, ref.path, ref.tag, ref.digest) == (
        "localhost:5000",
        "team/app",
        "1.2",
        "sha256:ab",
    )
    assert parse_image("registry.example.com:443/app").tag == ""
    with pytest.raises(ValueError):
        parse_image("docker.io/")


def test_image_patterns_match_trailing_paths_and_given_tags() -> None:
    image = "registry.example.com/team/shop:1.2"
    assert image_matches("shop", image) and image_matches("team/shop", image)
    assert image_matches("registry.example.com/team/shop:1.2", image)
    assert not image_matches("shop:1.3", image)
    assert not image_matches("eam/shop", image)  # whole path components only
    assert not image_matches("ghcr.io/team/shop", image)
    assert image_matches("nginx", "nginx:1.27") and image_matches("library/nginx", "nginx")


def test_known_images_run_their_stand_in_with_the_images_environment() -> None:
    text = _deployment(
        """        image: docker.io/istio/examples-bookinfo-reviews-v3:1.20.3
        env: [{name: STAR_COLOR, value: blue}]
        ports: [{containerPort: 9080}]"""
    )
    plan, problems = _plan_text(text)
    assert problems == [] and plan is not None
    (pod,) = plan.pods
    assert pod.command == ("trustmesh", "sample", "reviews", "--port=9080")
    # The image's ENV, then the pod's variables, then the container's own env.
    assert (pod.env["ENABLE_RATINGS"], pod.env["STAR_COLOR"]) == ("true", "blue")
    assert pod.env["HOSTNAME"] == "web" and pod.restart_policy == "Always"


@pytest.mark.parametrize(
    ("image", "command"),
    [
        ("docker.io/kennethreitz/httpbin", ("trustmesh", "sample", "httpbin", "--port=80")),
        (
            "docker.io/mccutchen/go-httpbin:v2.15.0",
            ("trustmesh", "sample", "httpbin", "--port=8080"),
        ),
        ("docker.io/curlimages/curl:8.16.0", ("trustmesh", "sample", "sleep")),
        (
            "registry.istio.io/release/examples-helloworld-v2:1.0",
            ("trustmesh", "sample", "helloworld", "--port=5000"),
        ),
        (
            "docker.io/istio/tcp-echo-server:1.2",
            ("trustmesh", "sample", "tcp-echo", "--port=9000", "--prefix=hello"),
        ),
    ],
)
def test_each_sample_image_runs_its_stand_in(image: str, command: tuple[str, ...]) -> None:
    stand_in = stand_in_for(image)
    assert stand_in is not None and stand_in.command() == command


def test_tcp_echo_args_are_its_ports_and_prefix_and_bad_args_are_errors_at_their_line() -> None:
    plan, _ = _plan_text(
        _deployment(
            """        image: registry.istio.io/release/tcp-echo-server:1.3
        args: ["9000,9001,9002", "hello"]"""
        )
    )
    assert plan is not None
    assert plan.pods[0].command == (
        "trustmesh",
        "sample",
        "tcp-echo",
        "--port=9000",
        "--port=9001",
        "--port=9002",
        "--prefix=hello",
    )
    plan, problems = _plan_text(
        _deployment(
            """        image: registry.istio.io/release/tcp-echo-server:1.3
        args: ["9000"]"""
        )
    )
    assert plan is None
    (problem,) = problems
    assert problem.code == "unrunnable-args" and problem.location.line == 11
    assert "exactly two args" in problem.message
    plan, problems = _plan_text(
        _deployment(
            """        image: istio/examples-bookinfo-details-v1
        args: [ruby, details.rb, "9080"]"""
        )
    )
    assert plan is None and problems[0].code == "unrunnable-args"


def test_image_mappings_come_first_and_take_the_containers_args() -> None:
    mapping = parse_image_command("shop=python3 -m shop --mode 'a b'")
    assert mapping == ImageCommand("shop", ("python3", "-m", "shop", "--mode", "a b"))
    text = _deployment(
        """        image: registry.example.com/team/shop:1.2
        args: [--verbose]"""
    )
    plan, problems = _plan_text(text, (mapping,))
    assert problems == [] and plan is not None
    assert plan.pods[0].command == ("python3", "-m", "shop", "--mode", "a b", "--verbose")
    reviews = _deployment("        image: istio/examples-bookinfo-reviews-v1")
    override = parse_image_command("examples-bookinfo-reviews-v1=./my-reviews")
    plan, _ = _plan_text(reviews, (override,))
    assert plan is not None and plan.pods[0].command == ("./my-reviews",)
    for bad in ("shop", "=x", "shop=", "shop='unclosed"):
        with pytest.raises(ValueError, match="--image"):
            parse_image_command(bad)


def test_up_refuses_a_bad_image_mapping_and_names_an_unknown_image(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(
        app,
        [
            "up",
            "--isolation",
            "process",
            str(BOOKINFO),
            "--image",
            "nocommand",
            "--state",
            str(tmp_path),
        ],
    )
    assert bad.exit_code == 2 and "--image must be IMAGE=COMMAND" in bad.output
    config = tmp_path / "config.yaml"
    config.write_text(_deployment("        image: example.com/unknown:1"))
    refused = runner.invoke(
        app, ["up", "--isolation", "process", str(config), "--state", str(tmp_path / "s")]
    )
    assert refused.exit_code == 1
    assert f"{config}:10" in refused.output and "unknown-image" in refused.output


def test_bookinfo_as_published_plans_every_pod_with_its_stand_in() -> None:
    loaded = load_config([str(BOOKINFO)])
    assert not loaded.errors
    plan, problems = plan_mesh(loaded.snapshot)
    assert problems == [] and plan is not None
    commands = {pod.name: pod.command[2] for pod in plan.pods}
    assert commands == {
        "details-v1": "details",
        "ratings-v1": "ratings",
        "reviews-v1": "reviews",
        "reviews-v2": "reviews",
        "reviews-v3": "reviews",
        "productpage-v1": "productpage",
    }
    assert all(pod.sidecar and pod.namespace == "default" for pod in plan.pods)
    round_trip = MeshPlan.from_json(plan.to_json())
    assert round_trip.pods == plan.pods


# ---------------------------------------------------------------------------- restarts


def test_restart_policy_is_honoured_for_pods_and_only_always_for_controllers() -> None:
    pod = """apiVersion: v1
kind: Pod
metadata: {name: once, namespace: shop}
spec:
  restartPolicy: Never
  containers:
  - name: once
    command: [./run]
"""
    plan, _ = _plan_text(pod)
    assert plan is not None and plan.pods[0].restart_policy == "Never"
    plan, problems = _plan_text(pod.replace("Never", "Sometimes"))
    assert plan is None and problems[0].code == "bad-restart-policy"
    assert problems[0].location.line == 5
    text = _deployment("        command: [./run]").replace(
        "    spec:\n", "    spec:\n      restartPolicy: OnFailure\n", 1
    )
    plan, problems = _plan_text(text)
    assert plan is None
    assert "supported values are Always" in problems[0].message
    assert problems[0].location.field == "spec.template.spec.restartPolicy"


def test_policies_decide_which_exits_restart() -> None:
    assert [should_restart("Always", code) for code in (0, 1)] == [True, True]
    assert [should_restart("OnFailure", code) for code in (0, 1)] == [False, True]
    assert [should_restart("Never", code) for code in (0, 1)] == [False, False]


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_run() -> None:
    backoff = Backoff()  # the kubelet's: 10 s, doubling, 5 min cap, reset after 10 min
    delays: list[float] = []
    previous = None
    for _ in range(8):
        previous = backoff.next_delay(previous, ran_for=1.0)
        delays.append(previous)
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]
    assert backoff.next_delay(300, ran_for=600) == 10
    scaled = Backoff.scaled(0.5)
    assert (scaled.initial, scaled.cap, scaled.reset_after) == (0.5, 15, 30)
    with pytest.raises(ValueError):
        Backoff.scaled(0)


def test_exits_are_recorded_as_kubernetes_shows_them() -> None:
    at = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert Exit.of(3, at).to_json() == {
        "exit_code": 3,
        "signal": None,
        "reason": "Error",
        "finished_at": "2025-01-02T03:04:05+00:00",
    }
    killed = Exit.of(-9, at)
    assert (killed.exit_code, killed.signal, killed.describe()) == (
        137,
        "SIGKILL",
        "SIGKILL (exit 137)",
    )
    assert Exit.of(0, at).reason == "Completed"


# ---------------------------------------------------------------------------- readiness


def _endpoint(workload: str, port: int) -> dict[str, object]:
    return {
        "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
        "metadata": {"filter_metadata": {"trustmesh": {"workload": workload}}},
    }


def test_not_ready_workloads_leave_clusters_without_touching_shared_dicts() -> None:
    cluster = {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "outbound|9080||reviews.default.svc.cluster.local",
        "load_assignment": {
            "cluster_name": "x",
            "endpoints": [
                {
                    "lb_endpoints": [
                        _endpoint("default/reviews-v1", 1),
                        _endpoint("default/reviews-v2", 2),
                    ]
                }
            ],
        },
    }
    other = {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l"}
    endpoints = EndpointFilter({"default/reviews-v1"})
    filtered, same = endpoints.apply([cluster, other])
    assert same is other
    (group,) = filtered["load_assignment"]["endpoints"]
    assert [
        e["metadata"]["filter_metadata"]["trustmesh"]["workload"] for e in group["lb_endpoints"]
    ] == ["default/reviews-v2"]
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2  # untouched
    assert endpoints.apply([cluster])[0] is filtered  # a shared cluster is filtered once
    everything = EndpointFilter({"default/reviews-v1", "default/reviews-v2"}).apply([cluster])[0]
    assert everything["load_assignment"]["endpoints"] == []
    assert EndpointFilter(()).apply([cluster])[0] is cluster


def test_pod_plans_keep_their_restart_policy_across_json() -> None:
    pod = PodPlan("ns", "p", "sa", False, "127.1.0.1", "127.1.0.1", None, (), ("x",), {}, "Never")
    assert PodPlan.from_json(pod.to_json()) == pod
    legacy = pod.to_json()
    del legacy["restart_policy"]  # a plan written before restarts existed
    assert PodPlan.from_json(legacy).restart_policy == "Always"
