"""Every overlay in deploy/kubernetes, rendered, against the Kubernetes
schemas (kubernetes-validate, strict, offline), and its custom resources
against the fields their CRDs define."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import kubernetes_validate
import pytest

from kustomize import merge, render

KUBERNETES = Path(__file__).resolve().parents[1] / "kubernetes"
OVERLAYS = sorted(p.parent for p in KUBERNETES.glob("*/kustomization.yaml"))
VERSION = "1.32.0"

# The fields each custom resource's CRD defines (the part we use is checked
# in full; unknown keys are the mistakes a schema would catch).
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
    "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}
SERVICE_MONITOR_SPEC = {
    "endpoints", "selector", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit",
    "targetLimit", "labelLimit", "attachMetadata",
}
SERVICE_MONITOR_ENDPOINT = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig", "authorization",
    "basicAuth", "oauth2", "bearerTokenSecret", "honorLabels", "honorTimestamps", "relabelings",
    "metricRelabelings", "followRedirects", "enableHttp2", "proxyUrl", "filterRunning",
}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def check_custom(obj: Dict[str, Any]) -> None:
    kind, spec = obj["kind"], obj["spec"]
    if kind == "ScaledObject":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
        assert spec["scaleTargetRef"]["name"]
        for trigger in spec["triggers"]:
            assert set(trigger) <= {"type", "metadata", "name", "authenticationRef", "metricType", "useCachedMetrics"}
            if trigger["type"] == "prometheus":
                assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
                assert all(isinstance(v, str) for v in trigger["metadata"].values()), "metadata values are strings"
    elif kind == "ServiceMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(spec) <= SERVICE_MONITOR_SPEC, set(spec) - SERVICE_MONITOR_SPEC
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT, set(endpoint) - SERVICE_MONITOR_ENDPOINT
            auth = endpoint.get("authorization")
            if auth:
                assert set(auth) <= {"type", "credentials"} and {"name", "key"} == set(auth["credentials"])
    elif kind == "PrometheusRule":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules", "partial_response_strategy", "limit"}
            for rule in group["rules"]:
                assert set(rule) <= RULE_FIELDS, set(rule) - RULE_FIELDS
                assert ("alert" in rule) != ("record" in rule) and rule["expr"]
    else:
        raise AssertionError(f"no check for the custom resource {kind}")


def rendered() -> List[Any]:
    return [pytest.param(overlay, id=overlay.name) for overlay in OVERLAYS]


def test_there_are_overlays() -> None:
    assert {o.name for o in OVERLAYS} >= {"single", "cluster"}


@pytest.mark.parametrize("overlay", rendered())
def test_every_object_is_valid(overlay: Path) -> None:
    objects = render(overlay)
    assert objects
    for obj in objects:
        if obj["apiVersion"].split("/")[0].endswith((".sh", "coreos.com")):
            check_custom(obj)
        else:
            kubernetes_validate.validate(obj, VERSION, strict=True)


@pytest.mark.parametrize("overlay", rendered())
def test_nodes_are_unprivileged_pinned_and_probed(overlay: Path) -> None:
    for obj in render(overlay):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["fsGroup"] == 10001
        grace = pod["terminationGracePeriodSeconds"]
        for container in pod["containers"]:
            assert not container["image"].endswith(":latest") and ":" in container["image"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert grace > int(env["HEARTH_SHUTDOWN_GRACE_S"]), "termination grace covers the shutdown grace"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert "memory" in container["resources"]["limits"]


def test_the_cluster_has_both_pools_as_statefulsets() -> None:
    objects = render(KUBERNETES / "cluster")
    pools = {o["metadata"]["name"]: o for o in objects if o["kind"] == "StatefulSet"}
    assert set(pools) == {"hearth", "hearth-gpu"}
    assert pools["hearth"]["spec"]["replicas"] == 2, "the overlay's patch applied"
    gpu = pools["hearth-gpu"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["containers"][0]["image"] == "hearth-cuda:0.1.0-cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    for pool in pools.values():
        assert pool["spec"]["volumeClaimTemplates"], "each node keeps its usage spool on its own volume"
    selectors = [tuple(sorted(p["spec"]["selector"]["matchLabels"].items())) for p in pools.values()]
    assert len(set(selectors)) == 2, "the pools' selectors do not overlap"
    kinds = {o["kind"] for o in objects}
    assert {"HorizontalPodAutoscaler", "ScaledObject", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceMonitor", "PrometheusRule"} <= kinds


def test_the_renderer_merges_lists_by_name() -> None:
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}]}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}]}
    merged = merge(base, patch)
    assert merged["containers"][0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
