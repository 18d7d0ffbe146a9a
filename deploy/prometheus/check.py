#!/usr/bin/env python3
"""Checks of deploy/prometheus and deploy/grafana that promtool alone cannot make; deploy/validate
runs each subcommand as one counted check. Each prints "ok ..." on success, else one problem per
line (and exits 1).

  check.py names            every metric the rules, their tests and the dashboard use is documented:
                            docs/metrics.md when it exists, else deploy/prometheus/metric-names.txt
  check.py alerts           every alert has a severity, a summary, a description and a runbook
                            section in docs/alerts.md, and every section there names an alert
  check.py dashboard DIR    the dashboard is JSON with the variables it needs and a query in every
                            panel; writes DIR/dashboard-queries.yml, each query (Grafana's
                            variables substituted) as an alert rule `count(QUERY) > 0`, and
                            DIR/dashboard-queries.test.yml, series of every metric of
                            metric-names.txt with its labels: `promtool test rules` on it shows
                            that every query parses and returns data from the documented metrics
  check.py kubernetes PROMTOOL   what prometheus-kubernetes.yml's pod discovery and relabelling
                            make of the pods in deploy/kubernetes: one target per role with
                            --metrics-address, on that port, with its role and host (see below)
  check.py static PROMTOOL  what prometheus-static.yml makes of targets/*.yml: every target on the
                            port its role's systemd unit or Mesos config uses
  check.py replay PROMTOOL STEP SNAPSHOT... --expect 'ALERT{label="v",...}'...
                            the alert rules on real metrics: SNAPSHOTs are /metrics answers (text
                            format) taken one after the other, replayed STEP apart (e.g. 1m:
                            snapshots taken seconds apart stand for minutes, so a rule's `for`
                            passes); after the last one, exactly the --expect alerts of those
                            names must fire (with their labels; the rules' annotations are left out)

Debian's promtool is built without Kubernetes discovery (it rejects kubernetes_sd_configs), so the
kubernetes check checks that block's fields itself, then hands promtool the same configuration
with the block replaced by a file of the targets pod discovery would produce for the manifests'
pods (the __meta_kubernetes_pod_* labels Prometheus documents), and lets `promtool check config`
and `promtool check service-discovery` apply the real relabelling to them.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PROM = os.path.join(ROOT, "deploy", "prometheus")
RULES = os.path.join(PROM, "cairn-alerts.yml")
TESTS = os.path.join(PROM, "cairn-alerts.test.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "cairn-dashboard.json")
METRICS_DOC = os.path.join(ROOT, "docs", "metrics.md")
NAMES_FILE = os.path.join(PROM, "metric-names.txt")
ALERTS_DOC = os.path.join(ROOT, "docs", "alerts.md")
# Series Prometheus makes itself, which the rules and the dashboard may use.
PROMETHEUS_SERIES = {"up", "ALERTS"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
METRIC = re.compile(r"\bcairn_[a-zA-Z0-9_]+")
# Grafana's variables, as a query sees them once Grafana has substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "1h",
                     "$volume": ".*", "$node": ".*"}


def done(problems, ok):
    problems = list(dict.fromkeys(problems))  # the same problem seen in both pods of a workload once
    print("\n".join(problems) if problems else f"ok {ok}")
    sys.exit(1 if problems else 0)


def rel(path):
    return os.path.relpath(path, ROOT)


def alert_rules():
    for group in yaml.safe_load(open(RULES))["groups"]:
        for rule in group["rules"]:
            yield rule


def dashboard_queries(dash):
    """(where, expr) of every query and variable query of the dashboard."""
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(dash.get("panels", [])):
        for t in p.get("targets", []):
            yield f"panel {p.get('id')} ({p.get('title')}) {t.get('refId')}", t.get("expr", "")
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if v.get("type") == "query":
            yield f"variable {v.get('name')}", q.get("query", "") if isinstance(q, dict) else (q or "")


# --- names -------------------------------------------------------------------------------------

def documented_names():
    """{name: is_histogram} from docs/metrics.md, else from metric-names.txt."""
    names = {}
    if os.path.exists(METRICS_DOC):
        for line in open(METRICS_DOC):
            histogram = "histogram" in line.lower()
            for name in METRIC.findall(line):
                names[name] = names.get(name, False) or histogram
        return names, rel(METRICS_DOC)
    for name, kind, _ in agreed_metrics():
        names[name] = kind == "histogram"
    return names, rel(NAMES_FILE) + " (docs/metrics.md does not exist yet)"


def agreed_metrics():
    """(name, type, [labels]) of metric-names.txt."""
    for line in open(NAMES_FILE):
        fields = line.split("#", 1)[0].split()
        if fields:
            yield fields[0], fields[1], fields[2].split(",") if len(fields) > 2 else []


def check_names():
    names, source = documented_names()
    used = []  # (where, name)
    for rule in alert_rules():
        used += [(f"{rel(RULES)}: {rule['alert']}", n) for n in METRIC.findall(rule["expr"])]
    for test in yaml.safe_load(open(TESTS))["tests"]:
        for s in test.get("input_series", []):
            used += [(f"{rel(TESTS)}: {test['name']}", n) for n in METRIC.findall(s["series"])]
    for where, expr in dashboard_queries(json.load(open(DASHBOARD))):
        used += [(f"{rel(DASHBOARD)}: {where}", n) for n in METRIC.findall(expr)]
    problems = []
    for where, name in used:
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if name in names or name in PROMETHEUS_SERIES or (base and names.get(base)):
            continue
        hint = f" ({base} is not documented as a histogram)" if base in names else ""
        problems.append(f"{where}: {name} is not a metric {source} documents{hint}")
    if not names:
        problems.append(f"{source}: no cairn_ metric names found")
    done(problems, f"{len({n for _, n in used})} metric names used, all documented in {source}")


# --- alerts ------------------------------------------------------------------------------------

def anchor(heading):
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def check_alerts():
    problems = []
    if not os.path.exists(ALERTS_DOC):
        done([f"{rel(ALERTS_DOC)} does not exist: every alert needs a runbook section there"], "")
    headings = {anchor(m.group(1)): m.group(1) for m in re.finditer(r"^## (.+)$", open(ALERTS_DOC).read(), re.M)}
    alerts = set()
    for rule in alert_rules():
        name = rule.get("alert")
        alerts.add(name)
        labels, annotations = rule.get("labels", {}), rule.get("annotations", {})
        if labels.get("severity") not in ("info", "warning", "critical"):
            problems.append(f"{name}: severity label must be info, warning or critical, not {labels.get('severity')!r}")
        for key in ("summary", "description", "runbook"):
            if not annotations.get(key, "").strip():
                problems.append(f"{name}: no {key} annotation")
        runbook = annotations.get("runbook", "")
        if runbook != f"docs/alerts.md#{name.lower()}":
            problems.append(f"{name}: runbook annotation must be docs/alerts.md#{name.lower()}, not {runbook!r}")
        if name.lower() not in headings:
            problems.append(f"{name}: {rel(ALERTS_DOC)} has no section '## {name}'")
    for a, heading in headings.items():
        if heading.startswith("Cairn") and heading not in alerts:
            problems.append(f"{rel(ALERTS_DOC)}: section '{heading}' names no alert of {rel(RULES)}")
    done(problems, f"{len(alerts)} alerts with severity, summary, description and a runbook in {rel(ALERTS_DOC)}")


# --- dashboard ---------------------------------------------------------------------------------

# Test series for the dashboard's queries: a value for every label, a few values where a query
# filters on them (a failed CSI call, a volume with bytes left to resync).
LABEL_VALUES = {"volume": ["vol-a"], "node": ["node-1"], "op": ["write"], "store": ["etcd"],
                "method": ["/csi.v1.Controller/CreateVolume"], "grpc_status_code": ["OK", "Internal"]}
GAUGE_VALUES = {"cairn_volume_replicas": "3x30", "cairn_volume_replicas_in_sync": "2x30",
                "cairn_volume_resync_remaining_bytes": "5e9-1e8x30", "cairn_volume_resync_progress_ratio": "0.5x30",
                "cairn_node_capacity_bytes": "1000x30", "cairn_node_used_bytes": "900x30"}
BUCKETS = [("0.001", 1), ("0.01", 3), ("0.1", 6), ("1", 9), ("+Inf", 10)]


def test_series():
    target = 'job="cairn",instance="10.0.0.21:7412",host="node-1"'
    series = []
    for name, kind, labels in agreed_metrics():
        combos = [[]]
        for label in labels:
            combos = [c + [f'{label}="{v}"'] for c in combos for v in LABEL_VALUES.get(label, ["x"])]
        for combo in combos:
            sel = ",".join([target] + combo)
            if kind == "histogram":
                series += [(f'{name}_bucket{{{sel},le="{le}"}}', f"0+{n}x30") for le, n in BUCKETS]
                series += [(f"{name}_count{{{sel}}}", "0+10x30"), (f"{name}_sum{{{sel}}}", "0+1x30")]
            else:
                series.append((f"{name}{{{sel}}}", "0+10x30" if kind == "counter" else GAUGE_VALUES.get(name, "1x30")))
    return series


def check_dashboard(outdir):
    try:
        dash = json.load(open(DASHBOARD))
    except Exception as e:
        done([f"{rel(DASHBOARD)}: not JSON: {e}"], "")
    problems = []
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource" or variables["datasource"].get("query") != "prometheus":
        problems.append("the dashboard needs a `datasource` variable of type datasource (query prometheus)")
    for name in ("volume", "node"):
        if variables.get(name, {}).get("type") != "query":
            problems.append(f"the dashboard needs a `{name}` query variable")
    ids, panels = set(), 0
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            continue
        panels += 1
        where = f"panel {p.get('id')} ({p.get('title')!r})"
        if p.get("id") in ids:
            problems.append(f"{where}: duplicate id")
        ids.add(p.get("id"))
        if not p.get("title") or not p.get("gridPos"):
            problems.append(f"{where}: needs a title and a gridPos")
        sources = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]
        if any((s or {}).get("uid") != "${datasource}" for s in sources):
            problems.append(f"{where}: its data source (and each query's) must be ${{datasource}}")
        if not [t for t in p.get("targets", []) if t.get("expr", "").strip()]:
            problems.append(f"{where}: no query")
    if not panels:
        problems.append("the dashboard has no panels")
    # The queries as alert rules that fire when the query returns anything.
    rules, tests = [], []
    for i, (where, expr) in enumerate(dashboard_queries(dash)):
        if where.startswith("variable"):
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", expr.strip())
            if not m:
                problems.append(f"{where}: expected label_values(METRIC, LABEL), got {expr!r}")
                continue
            expr = m.group(1)
        for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, value)
        if "$" in expr:
            problems.append(f"{where}: a Grafana variable the check does not know: {expr}")
        name = re.sub(r"[^A-Za-z0-9_]+", "_", where.split(" (")[0] + " " + where.rsplit(" ", 1)[-1])
        rules.append({"alert": name, "expr": f"count({expr}) > 0"})
        tests.append({"eval_time": "20m", "alertname": name, "exp_alerts": [{"exp_labels": {}}]})
    rules_file = os.path.join(outdir, "dashboard-queries.yml")
    yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, open(rules_file, "w"), width=10**6)
    yaml.safe_dump({"rule_files": [rules_file], "evaluation_interval": "1m", "tests": [{
        "name": "every dashboard query returns data from the documented metrics", "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in test_series()],
        "alert_rule_test": tests}]}, open(os.path.join(outdir, "dashboard-queries.test.yml"), "w"), width=10**6)
    done(problems, f"{panels} panels, each with a query; variables datasource, volume, node")


# --- scrape configurations ---------------------------------------------------------------------

def flag(args, name):
    """The value of --name=V or --name V in an argument list or a command line."""
    if isinstance(args, str):
        args = args.split()
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def discover(promtool, config, job):
    out = subprocess.run([promtool, "check", "service-discovery", "--timeout=5s", config, job],
                         capture_output=True, text=True, cwd=os.path.dirname(config))
    if out.returncode != 0:
        return None, f"promtool check service-discovery {rel(config)} {job}: {out.stdout}{out.stderr}"
    # Targets the relabelling dropped are listed too, with no labels left.
    return [t["labels"] for t in json.loads(out.stdout) if t.get("labels")], None


K8S_SD_FIELDS = {"role", "api_server", "kubeconfig_file", "namespaces", "selectors", "attach_metadata",
                 "basic_auth", "authorization", "oauth2", "proxy_url", "no_proxy", "proxy_from_environment",
                 "proxy_connect_header", "follow_redirects", "enable_http2", "tls_config"}


def check_kubernetes(promtool):
    config_path = os.path.join(PROM, "prometheus-kubernetes.yml")
    config = yaml.safe_load(open(config_path))
    problems = []
    jobs = [j for j in config["scrape_configs"] if j.get("kubernetes_sd_configs")]
    if len(jobs) != 1:
        done([f"{rel(config_path)}: expected one job with kubernetes_sd_configs, found {len(jobs)}"], "")
    job = jobs[0]
    namespaces, selector = set(), {}
    for sd in job["kubernetes_sd_configs"]:
        unknown = set(sd) - K8S_SD_FIELDS
        if unknown:
            problems.append(f"kubernetes_sd_configs: fields Prometheus does not have: {sorted(unknown)}")
        if sd.get("role") != "pod":
            problems.append("kubernetes_sd_configs: role must be pod (one target per container port)")
        if set(sd.get("namespaces", {})) - {"names", "own_namespace"}:
            problems.append("kubernetes_sd_configs.namespaces: only names and own_namespace")
        namespaces |= set(sd.get("namespaces", {}).get("names", []))
        for s in sd.get("selectors", []):
            if set(s) - {"role", "label", "field"} or s.get("role") not in ("pod", "node", "service", "endpoints", "endpointslice", "ingress"):
                problems.append(f"kubernetes_sd_configs.selectors: {s} is not a selector")
            for term in (s.get("label") or "").split(","):
                if term:
                    k, _, v = term.partition("=")
                    selector[k.strip()] = v.strip()
    # The pods the manifests make, as pod discovery would list them: two per workload, on node-1
    # and node-2 (a DaemonSet's pod with hostNetwork has the node's address).
    targets, expected = [], []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml"))):
        for doc in yaml.safe_load_all(open(path)):
            if not doc or doc.get("kind") not in ("Deployment", "DaemonSet", "StatefulSet"):
                continue
            ns, tpl = doc["metadata"].get("namespace"), doc["spec"]["template"]
            labels, spec = tpl["metadata"].get("labels", {}), tpl["spec"]
            if ns not in namespaces or any(labels.get(k) != v for k, v in selector.items()):
                serves = [c["name"] for c in spec["containers"] if c.get("args", [None])[0] == "serve"]
                if serves:
                    problems.append(f"{rel(path)}: {doc['metadata']['name']} runs cairn serve but the scrape job does not discover its pods (namespace {ns}, labels {labels})")
                continue
            for n, host in enumerate(("node-1", "node-2"), start=1):
                pod = f"{doc['metadata']['name']}-{n}"
                ip = f"10.0.0.2{n}" if spec.get("hostNetwork") else f"10.244.{n}.7"
                meta = {"__meta_kubernetes_namespace": ns, "__meta_kubernetes_pod_name": pod,
                        "__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_node_name": host,
                        "__meta_kubernetes_pod_host_ip": f"10.0.0.2{n}", "__meta_kubernetes_pod_phase": "Running",
                        "__meta_kubernetes_pod_ready": "true",
                        "__meta_kubernetes_pod_controller_kind": "ReplicaSet" if doc["kind"] == "Deployment" else doc["kind"]}
                meta.update({"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in labels.items()})
                for c in spec["containers"]:
                    cmeta = dict(meta, __meta_kubernetes_pod_container_name=c["name"],
                                 __meta_kubernetes_pod_container_init="false")
                    ports = c.get("ports", [])
                    if not ports:
                        targets.append({"targets": [ip], "labels": cmeta})
                    for p in ports:
                        targets.append({"targets": [f"{ip}:{p['containerPort']}"], "labels": dict(
                            cmeta, __meta_kubernetes_pod_container_port_name=p.get("name", ""),
                            __meta_kubernetes_pod_container_port_number=str(p["containerPort"]),
                            __meta_kubernetes_pod_container_port_protocol=p.get("protocol", "TCP"))})
                    args = c.get("args", [])
                    if args[:1] != ["serve"]:
                        continue
                    address = flag(args, "metrics-address")
                    if not address:
                        problems.append(f"{rel(path)}: container {c['name']} runs cairn serve without --metrics-address")
                        continue
                    port = address.rsplit(":", 1)[1]
                    if not any(str(p["containerPort"]) == port for p in ports):
                        problems.append(f"{rel(path)}: container {c['name']} serves metrics on {port} but declares no containerPort {port}")
                    expected.append({"instance": f"{ip}:{port}", "role": flag(args, "role"), "host": host,
                                     "pod": pod, "container": c["name"], "namespace": ns})
    if not expected:
        problems.append("no container of deploy/kubernetes runs cairn serve with --metrics-address")
    with tempfile.TemporaryDirectory(prefix="cairn-prom-k8s.") as tmp:
        sd_file = os.path.join(tmp, "pods.yml")
        yaml.safe_dump(targets, open(sd_file, "w"))
        job.pop("kubernetes_sd_configs")
        job["file_sd_configs"] = [{"files": [sd_file]}]
        config["rule_files"] = [os.path.join(PROM, f) for f in config.get("rule_files", [])]
        stand_in = os.path.join(tmp, "prometheus.yml")
        yaml.safe_dump(config, open(stand_in, "w"))
        out = subprocess.run([promtool, "check", "config", stand_in], capture_output=True, text=True)
        if out.returncode != 0:
            done(problems + [f"promtool check config (kubernetes_sd_configs replaced by a file of the pods' targets): {out.stdout}{out.stderr}"], "")
        got, error = discover(promtool, stand_in, job["job_name"])
    if error:
        done(problems + [error], "")
    keys = ("instance", "role", "host", "pod", "container", "namespace")
    got = sorted(tuple(t.get(k) or "" for k in keys) for t in got)
    want = sorted(tuple(e[k] for k in keys) for e in expected)
    for t in sorted(set(got) - set(want)):
        problems.append(f"scraped but not a metrics endpoint: {dict(zip(keys, t))}")
    for t in sorted(set(want) - set(got)):
        problems.append(f"a metrics endpoint not scraped (or with other labels): {dict(zip(keys, t))}")
    done(problems, f"{len(got)} targets from {len(targets)} discovered containers and ports, each a --metrics-address with its role and host (promtool check config + service-discovery)")


def unit_ports():
    """{role: metrics port} of the systemd units and the Mesos cluster config."""
    ports, problems = {}, []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "systemd", "cairn-*.service"))):
        text = open(path).read().replace("\\\n", " ")
        m = re.search(r"^ExecStart=\S*cairn serve (.*)$", text, re.M)
        if not m:
            continue
        address = flag(m.group(1), "metrics-address")
        if not address:
            problems.append(f"{rel(path)}: cairn serve without --metrics-address")
            continue
        ports[flag(m.group(1), "role")] = address.rsplit(":", 1)[1]
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "mesos", "resource-providers", "*.json"))):
        for c in json.load(open(path))["storage"]["plugin"]["containers"]:
            cmd = c["command"]["value"]
            env = {v["name"]: v["value"] for v in c["command"].get("environment", {}).get("variables", [])}
            address = flag(cmd, "metrics-address")
            if not address:
                problems.append(f"{rel(path)}: cairn serve without --metrics-address")
                continue
            address = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), m.group(0)), address)
            ports.setdefault(flag(cmd, "role"), address.rsplit(":", 1)[1])
    return ports, problems


def check_static(promtool):
    config = os.path.join(PROM, "prometheus-static.yml")
    ports, problems = unit_ports()
    got, error = discover(promtool, config, "cairn")
    if error:
        done(problems + [error], "")
    if not got:
        problems.append(f"{rel(config)}: no targets discovered from targets/*.yml")
    for t in got:
        role, port = t.get("role"), t["__address__"].rsplit(":", 1)[-1]
        if role not in ports:
            problems.append(f"target {t['__address__']}: role {role!r} is none of the units' or Mesos configs' roles {sorted(ports)}")
        elif ports[role] != port:
            problems.append(f"target {t['__address__']}: the {role} role serves metrics on port {ports[role]}")
        if not t.get("host"):
            problems.append(f"target {t['__address__']}: no host label")
        if "node" in t or "volume" in t:
            problems.append(f"target {t['__address__']}: a node or volume target label would shadow Cairn's own")
    done(problems, f"{len(got)} targets, each on its role's port ({', '.join(f'{r} {p}' for r, p in sorted(ports.items()))})")


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")
EXPECT = re.compile(r"^(\w+)(?:\{(.*)\})?$")


def check_replay(promtool, step, snapshots, expect):
    steps = int(re.fullmatch(r"(\d+)m", step).group(1)) if re.fullmatch(r"\d+m", step) else None
    if not steps or not snapshots or not expect:
        done(["usage: check.py replay PROMTOOL STEP(e.g. 1m) SNAPSHOT... --expect 'ALERT{label=\"value\"}'..."], "")
    series = {}  # selector -> [value per snapshot]
    for i, path in enumerate(snapshots):
        for line in open(path):
            m = SAMPLE.match(line.strip())
            if not m or line.startswith("#"):
                continue
            name, labels, value = m.group(1), (m.group(2) or "{}")[1:-1], m.group(3)
            selector = f'{name}{{job="cairn",instance="replay"{"," + labels if labels else ""}}}'
            series.setdefault(selector, ["_"] * len(snapshots))[i] = value
    series['up{job="cairn",instance="replay"}'] = ["1"] * len(snapshots)
    expected = {}
    for e in expect:
        m = EXPECT.match(e.strip())
        if not m:
            done([f"--expect {e!r}: not ALERT or ALERT{{label=\"value\",...}}"], "")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        expected.setdefault(m.group(1), []).append({"exp_labels": labels})
    with tempfile.TemporaryDirectory(prefix="cairn-replay.") as tmp:
        rules = yaml.safe_load(open(RULES))
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        rules_file = os.path.join(tmp, "rules.yml")
        yaml.safe_dump(rules, open(rules_file, "w"), width=10**6)
        at = f"{(len(snapshots) - 1) * steps}m"
        test = {"rule_files": [rules_file], "evaluation_interval": step, "tests": [{
            "name": f"{len(snapshots)} snapshots replayed {step} apart", "interval": step,
            "input_series": [{"series": k, "values": " ".join(v)} for k, v in sorted(series.items())],
            "alert_rule_test": [{"eval_time": at, "alertname": a, "exp_alerts": x} for a, x in sorted(expected.items())]}]}
        test_file = os.path.join(tmp, "replay.test.yml")
        yaml.safe_dump(test, open(test_file, "w"), width=10**6)
        out = subprocess.run([promtool, "test", "rules", test_file], capture_output=True, text=True)
    if out.returncode != 0:
        done([f"promtool test rules on {len(snapshots)} snapshots of {len(series)} series, replayed {step} apart:", out.stdout + out.stderr], "")
    done([], f"{len(snapshots)} snapshots of {len(series)} series replayed {step} apart: at {at} firing exactly {', '.join(expect)}")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "names":
        check_names()
    elif command == "alerts":
        check_alerts()
    elif command == "dashboard" and len(sys.argv) == 3:
        check_dashboard(sys.argv[2])
    elif command == "kubernetes" and len(sys.argv) == 3:
        check_kubernetes(sys.argv[2])
    elif command == "static" and len(sys.argv) == 3:
        check_static(sys.argv[2])
    elif command == "replay" and len(sys.argv) > 3:
        rest = sys.argv[4:]
        expect = [rest[i + 1] for i, a in enumerate(rest) if a == "--expect" and i + 1 < len(rest)]
        files = [a for i, a in enumerate(rest) if a != "--expect" and (i == 0 or rest[i - 1] != "--expect")]
        check_replay(sys.argv[2], sys.argv[3], files, expect)
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
