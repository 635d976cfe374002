"""The shipped Grafana dashboard only queries metrics the code really exports."""

import json
import os
import re

from raydeeplab import telemetry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dashboard_queries_only_metrics_the_code_defines():
    source = open(telemetry.__file__).read()
    defined = set(re.findall(r'"(raydeeplab_\w+)"', source))
    dashboard = json.load(open(os.path.join(REPO, "k8s", "grafana-dashboard.json")))
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ray_(raydeeplab_\w+)", target["expr"]):
                queried.add(re.sub(r"_(total|bucket|sum|count)$", "", name))
    assert queried and queried <= defined, queried - defined
    assert defined <= queried, f"exported but not on the dashboard: {defined - queried}"
