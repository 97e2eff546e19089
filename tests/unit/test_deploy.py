"""deploy/: the manifests, the Slurm script and the Containerfile agree with each other and with the CLI.

Nothing here needs a cluster. The cross-file checks are functions over the parsed manifests so that
`test_checks_catch_mismatches` can break one file at a time and prove each check bites.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SBATCH = DEPLOY / "slurm" / "stalwart.sbatch"
CONTAINERFILE = DEPLOY / "Containerfile"


def cli_flags(command: str) -> set[str]:
    """Every option string ``stalwart COMMAND`` accepts, read off the real parser."""
    from stalwart.cli.main import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for action in subparsers.choices[command]._actions for o in action.option_strings} - {"-h", "--help"}


# The manifests may use any flag the real parsers accept, and must pass these.
ALLOWED_FLAGS = {command: cli_flags(command) for command in ("launch", "healthd", "controller", "store")}
REQUIRED_FLAGS = {
    "launch": {"--config", "--nnodes", "--nproc-per-node", "--rdzv-endpoint", "--rdzv-id"},
    "healthd": {"--run-dir", "--bind", "--token-file"},
    "controller": {"--run-dir", "--grpc-bind", "--http-bind", "--token-file"},
    "store": {"--bind"},
}
RDZV_PORT = 29400
HEALTHD_PORT = 50051
CONTROLLER_GRPC_PORT = 50052
CONTROLLER_HTTP_PORT = 8080
TOKEN_SECRET = "stalwart-job-token"
TOKEN_ENV = "STALWART_TOKEN_FILE"
EXIT_NODE_EXCLUDED = 93
# Files in deploy/k8s that kustomization.yaml must NOT list, and why.
NOT_IN_KUSTOMIZATION = {
    "secret.example.yaml": "the token must not live in git",
    "pytorchjob.yaml": "alternative to jobset.yaml for Training Operator v1",
}
NODE_IP = "<node-ip>"  # what status.hostIP resolves to in these checks


# ---------------------------------------------------------------- parsing helpers


def load_manifests() -> dict[str, list[dict]]:
    """Every YAML file under deploy/k8s (multi-document), keyed by file name."""
    out = {}
    for path in sorted(K8S.glob("*.y*ml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def find(manifests: dict[str, list[dict]], kind: str, file: str | None = None) -> dict:
    docs = [d for name, ds in manifests.items() if file in (None, name) for d in ds if d.get("kind") == kind]
    assert len(docs) == 1, f"expected exactly one {kind} in deploy/k8s{'/' + file if file else ''}, found {len(docs)}"
    return docs[0]


@dataclass
class Pod:
    """A pod template inside some workload, with the labels its controller adds to every pod."""

    where: str
    metadata: dict
    spec: dict
    injected_labels: dict[str, str]


def pods_of(doc: dict) -> list[Pod]:
    kind = doc.get("kind")
    if kind not in ("Deployment", "DaemonSet", "JobSet", "PyTorchJob"):
        return []
    name = doc["metadata"]["name"]
    if kind in ("Deployment", "DaemonSet"):
        t = doc["spec"]["template"]
        return [Pod(f"{kind}/{name}", t.get("metadata", {}), t["spec"], {})]
    if kind == "JobSet":
        return [
            Pod(
                f"JobSet/{name}/{rj['name']}",
                rj["template"]["spec"]["template"].get("metadata", {}),
                rj["template"]["spec"]["template"]["spec"],
                {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rj["name"]},
            )
            for rj in doc["spec"]["replicatedJobs"]
        ]
    if kind == "PyTorchJob":
        return [
            Pod(
                f"PyTorchJob/{name}/{rtype}",
                rs["template"].get("metadata", {}),
                rs["template"]["spec"],
                {"training.kubeflow.org/job-name": name},
            )
            for rtype, rs in doc["spec"]["pytorchReplicaSpecs"].items()
        ]
    return []


def all_pods(manifests: dict[str, list[dict]]) -> list[Pod]:
    return [p for docs in manifests.values() for d in docs for p in pods_of(d)]


def resolve_env(container: dict, pod: Pod) -> dict[str, str]:
    """The container's environment as the kubelet would see it (fieldRefs resolved, $(VAR) expanded)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env, f"{pod.where} env {e['name']}")
            continue
        path = e["valueFrom"]["fieldRef"]["fieldPath"]
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        if label:
            key = label.group(1)
            assert key in pod.injected_labels, (
                f"{pod.where}: env {e['name']} reads label {key!r}, which the controller never sets"
            )
            env[e["name"]] = pod.injected_labels[key]
        elif path == "status.hostIP":
            env[e["name"]] = NODE_IP
        elif path in ("spec.nodeName", "metadata.name", "metadata.namespace", "status.podIP"):
            env[e["name"]] = f"<{path}>"
        else:
            raise AssertionError(f"{pod.where}: env {e['name']} uses unexpected fieldRef {path}")
    return env


def expand(value: str, env: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"{where}: $({m.group(1)}) is not defined before its use"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def split_flags(argv: list[str], where: str) -> tuple[str, dict[str, str]]:
    """`stalwart SUB --flag value ...` -> (SUB, {flag: value}); every flag takes one value."""
    assert argv[0] == "stalwart" and len(argv) > 1, f"{where}: not a stalwart invocation: {argv}"
    sub, rest, flags = argv[1], argv[2:], {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        assert tok.startswith("--"), f"{where}: stray argument {tok!r} in `stalwart {sub}`"
        if "=" in tok:
            name, value = tok.split("=", 1)
            i += 1
        else:
            assert i + 1 < len(rest), f"{where}: flag {tok} has no value"
            name, value = tok, rest[i + 1]
            i += 2
        assert name not in flags, f"{where}: flag {name} given twice"
        flags[name] = value
    return sub, flags


@dataclass
class Invocation:
    where: str
    sub: str
    flags: dict[str, str]


def k8s_invocations(manifests: dict[str, list[dict]], resolved: bool = True) -> list[tuple[Pod, dict, Invocation]]:
    out = []
    for pod in all_pods(manifests):
        for c in pod.spec["containers"]:
            argv = list(c.get("command", [])) + list(c.get("args", []))
            env = resolve_env(c, pod)
            if resolved:
                argv = [expand(a, env, f"{pod.where}/{c['name']} args") for a in argv]
            sub, flags = split_flags(argv, f"{pod.where}/{c['name']}")
            out.append((pod, c, Invocation(f"{pod.where}/{c['name']}", sub, flags)))
    return out


def shell_logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def shell_invocations(text: str, where: str) -> list[Invocation]:
    """`stalwart SUB ...` commands inside shell text, up to the end of their simple command."""
    out = []
    for line in shell_logical_lines(text):
        if not re.search(r"\bstalwart\s+(launch|healthd|controller|store)\b", line):
            continue
        tokens = shlex.split(line, comments=True)
        for i, tok in enumerate(tokens[:-1]):
            if tok == "stalwart" and tokens[i + 1] in ALLOWED_FLAGS:
                argv = []
                for t in tokens[i:]:
                    if t in {"&", "&&", "||", "|", ";"} or t.startswith((">", "2>")):
                        break
                    argv.append(t)
                sub, flags = split_flags(argv, where)
                out.append(Invocation(where, sub, flags))
    return out


def readme_invocations() -> list[Invocation]:
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.DOTALL)
    return [inv for b in blocks for inv in shell_invocations(b, "deploy/README.md")]


def port_of(hostport: str) -> int:
    host, _, port = hostport.rpartition(":")
    assert host and port.isdigit(), f"{hostport!r} is not HOST:PORT"
    return int(port)


def container_port(container: dict, ref: int | str) -> int:
    """A probe/targetPort reference (number or port name) as the container port number."""
    if isinstance(ref, int):
        return ref
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert ref in named, f"container {container['name']} has no port named {ref!r} (has {sorted(named)})"
    return named[ref]


def only_container(doc: dict) -> dict:
    (pod,) = pods_of(doc)
    (c,) = pod.spec["containers"]
    return c


def invocation_of(manifests, doc: dict) -> Invocation:
    (pod,) = pods_of(doc)
    return next(inv for p, _, inv in k8s_invocations(manifests) if p.where == pod.where)


# ---------------------------------------------------------------- checks (each raises AssertionError)


def check_required_fields(manifests: dict[str, list[dict]]) -> None:
    for name, docs in manifests.items():
        if name == "kustomization.yaml":
            continue
        assert docs, f"deploy/k8s/{name} holds no document"
        for d in docs:
            assert d.get("apiVersion") and d.get("kind"), f"{name}: a document lacks apiVersion or kind"
            assert isinstance(d.get("metadata", {}).get("name"), str), f"{name}: {d['kind']} lacks metadata.name"
            if d["kind"] in ("Deployment", "DaemonSet"):
                selector = d["spec"]["selector"]["matchLabels"]
                labels = d["spec"]["template"]["metadata"]["labels"]
                assert selector.items() <= labels.items(), (
                    f"{name}: selector {selector} does not match template labels {labels}"
                )
    for pod in all_pods(manifests):
        volumes = {v["name"] for v in pod.spec.get("volumes", [])}
        for c in pod.spec["containers"]:
            where = f"{pod.where}/{c.get('name')}"
            assert c.get("image"), f"{where}: no image"
            assert c.get("command") == ["stalwart"] and c.get("args"), f"{where}: expected command [stalwart] plus args"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: mounts undefined volume {m['name']!r}"


def check_kustomization(manifests: dict[str, list[dict]]) -> None:
    kust = manifests["kustomization.yaml"][0]
    listed = list(kust["resources"])
    present = set(manifests) - {"kustomization.yaml"}
    assert len(listed) == len(set(listed)), f"kustomization.yaml lists a file twice: {listed}"
    assert not set(listed) & set(NOT_IN_KUSTOMIZATION), (
        f"kustomization.yaml must not list {set(listed) & set(NOT_IN_KUSTOMIZATION)}"
    )
    assert set(listed) | set(NOT_IN_KUSTOMIZATION) == present, (
        f"deploy/k8s has {sorted(present)}; kustomization.yaml lists {sorted(listed)}; "
        f"unlisted on purpose: {sorted(NOT_IN_KUSTOMIZATION)}"
    )
    image_names = {c["image"].rsplit(":", 1)[0] for p in all_pods(manifests) for c in p.spec["containers"]}
    assert image_names == {i["name"] for i in kust["images"]}, (
        f"containers use {image_names}; kustomization rewrites {kust['images']}"
    )


def check_flags(invocations: list[Invocation]) -> None:
    for inv in invocations:
        assert inv.sub in ALLOWED_FLAGS, f"{inv.where}: unknown subcommand {inv.sub!r}"
        unknown = set(inv.flags) - ALLOWED_FLAGS[inv.sub]
        assert not unknown, (
            f"{inv.where}: `stalwart {inv.sub}` has no flag {sorted(unknown)}; valid: {sorted(ALLOWED_FLAGS[inv.sub])}"
        )
        missing = REQUIRED_FLAGS[inv.sub] - set(inv.flags)
        assert not missing, f"{inv.where}: `stalwart {inv.sub}` misses {sorted(missing)}"
        if inv.sub == "launch":
            assert port_of(inv.flags["--rdzv-endpoint"]) == RDZV_PORT, f"{inv.where}: rendezvous is on port {RDZV_PORT}"
            assert re.fullmatch(r"(\d+|\$\w+|\$\{\w+\})(:\d+)?", inv.flags["--nnodes"].strip('"')), (
                f"{inv.where}: --nnodes N or MIN:MAX"
            )
        if inv.sub == "healthd":
            assert port_of(inv.flags["--bind"]) == HEALTHD_PORT
        if inv.sub == "controller":
            assert port_of(inv.flags["--grpc-bind"]) == CONTROLLER_GRPC_PORT
            assert port_of(inv.flags["--http-bind"]) == CONTROLLER_HTTP_PORT
        if inv.sub == "store":
            assert port_of(inv.flags["--bind"]) == RDZV_PORT, f"{inv.where}: the store serves the rendezvous port"


def check_healthd(manifests: dict[str, list[dict]]) -> None:
    ds = find(manifests, "DaemonSet")
    pod_spec = ds["spec"]["template"]["spec"]
    c = only_container(ds)
    inv = invocation_of(manifests, ds)
    assert inv.sub == "healthd"
    port = port_of(inv.flags["--bind"])
    (p,) = [p for p in c["ports"] if p["containerPort"] == port]
    assert p.get("hostPort") == port, (
        f"healthd: hostPort {p.get('hostPort')} != bind port {port} (ranks dial <node IP>:{port})"
    )
    assert "grpc" in c["livenessProbe"] and "grpc" in c["readinessProbe"], "healthd probes must be kubelet gRPC probes"
    assert container_port(c, c["livenessProbe"]["grpc"]["port"]) == port, (
        "healthd liveness must be grpc.health.v1 on the bind port"
    )
    assert container_port(c, c["readinessProbe"]["grpc"]["port"]) == port
    assert pod_spec.get("hostPID") is True, "healthd needs hostPID to see (and py-spy) the ranks"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod_spec["tolerations"])
    assert pod_spec.get("nodeSelector"), "healthd belongs on GPU nodes only"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), "healthd must not take GPUs away from training"


def check_controller(manifests: dict[str, list[dict]]) -> None:
    dep = find(manifests, "Deployment", "controller.yaml")
    svc = find(manifests, "Service", "controller.yaml")
    assert dep["spec"]["replicas"] == 1
    c = only_container(dep)
    inv = invocation_of(manifests, dep)
    assert inv.sub == "controller"
    grpc, http = port_of(inv.flags["--grpc-bind"]), port_of(inv.flags["--http-bind"])
    assert {p["containerPort"] for p in c["ports"]} == {grpc, http}, (
        f"controller ports {c['ports']} vs binds {grpc}, {http}"
    )
    assert "grpc" in c["livenessProbe"], "controller liveness must be a kubelet gRPC probe"
    assert container_port(c, c["livenessProbe"]["grpc"]["port"]) == grpc, (
        "controller liveness must be grpc.health.v1 on --grpc-bind"
    )
    ready = c["readinessProbe"]["httpGet"]
    assert ready["path"] == "/healthz" and container_port(c, ready["port"]) == http
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), "the Service does not select the controller pods"
    for pod in all_pods(manifests):
        if pod.where != f"Deployment/{dep['metadata']['name']}":
            assert not svc["spec"]["selector"].items() <= pod.metadata.get("labels", {}).items(), (
                f"the controller Service also selects {pod.where}"
            )
    targets = {container_port(c, p["targetPort"]): p for p in svc["spec"]["ports"]}
    assert set(targets) == {grpc, http}, f"Service targets {sorted(targets)}, controller listens on {grpc}, {http}"
    assert targets[http]["name"] == "http-metrics"
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == targets[http]["port"]
    assert ann["prometheus.io/path"] == "/metrics"


def controller_address(manifests) -> set[str]:
    """Addresses that reach the controller's gRPC port through its Service."""
    svc = find(manifests, "Service", "controller.yaml")
    c = only_container(find(manifests, "Deployment", "controller.yaml"))
    grpc = port_of(invocation_of(manifests, find(manifests, "Deployment", "controller.yaml")).flags["--grpc-bind"])
    (port,) = [p["port"] for p in svc["spec"]["ports"] if container_port(c, p["targetPort"]) == grpc]
    name = svc["metadata"]["name"]
    return {
        f"{host}:{port}"
        for host in (name, f"{name}.stalwart", f"{name}.stalwart.svc", f"{name}.stalwart.svc.cluster.local")
    }


def store_address(manifests) -> set[str]:
    """Addresses that reach the head-node store through its Service."""
    svc = find(manifests, "Service", "store.yaml")
    c = only_container(find(manifests, "Deployment", "store.yaml"))
    bind = port_of(invocation_of(manifests, find(manifests, "Deployment", "store.yaml")).flags["--bind"])
    (port,) = [p["port"] for p in svc["spec"]["ports"] if container_port(c, p["targetPort"]) == bind]
    name = svc["metadata"]["name"]
    return {
        f"{host}:{port}"
        for host in (name, f"{name}.stalwart", f"{name}.stalwart.svc", f"{name}.stalwart.svc.cluster.local")
    }


def check_store(manifests: dict[str, list[dict]]) -> None:
    """The rendezvous store runs on a pod of its own that trains nothing, reached through its Service."""
    dep = find(manifests, "Deployment", "store.yaml")
    svc = find(manifests, "Service", "store.yaml")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate", (
        "exactly one store at a time: two would split the job's membership"
    )
    c = only_container(dep)
    inv = invocation_of(manifests, dep)
    assert inv.sub == "store"
    bind = port_of(inv.flags["--bind"])
    assert {p["containerPort"] for p in c["ports"]} == {bind}, f"store ports {c['ports']} vs --bind {bind}"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container_port(c, c[probe]["tcpSocket"]["port"]) == bind, f"store {probe} must connect to --bind"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), "the store trains nothing: no GPUs"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), "the store Service does not select the store pod"
    for pod in all_pods(manifests):
        if pod.where != f"Deployment/{dep['metadata']['name']}":
            assert not svc["spec"]["selector"].items() <= pod.metadata.get("labels", {}).items(), (
                f"the store Service also selects {pod.where}"
            )
    assert {container_port(c, p["targetPort"]) for p in svc["spec"]["ports"]} == {bind}


def check_trainer(manifests: dict[str, list[dict]], file: str) -> None:
    kinds = {"jobset.yaml": "JobSet", "pytorchjob.yaml": "PyTorchJob"}
    doc = find(manifests, kinds[file], file)
    name = doc["metadata"]["name"]
    (pod,) = pods_of(doc)
    (c,) = pod.spec["containers"]
    inv = invocation_of(manifests, doc)
    assert inv.sub == "launch"
    f = inv.flags
    healthd_ds = find(manifests, "DaemonSet")
    healthd_port = port_of(invocation_of(manifests, healthd_ds).flags["--bind"])
    assert f["--healthd"] == f"{NODE_IP}:{healthd_port}", (
        f"{file}: --healthd resolves to {f['--healthd']}, healthd listens on <node IP>:{healthd_port}"
    )
    assert f["--controller"] in controller_address(manifests), (
        f"{file}: --controller {f['--controller']} is not the controller Service's gRPC port"
    )
    assert f["--rdzv-id"] == name, f"{file}: --rdzv-id resolves to {f['--rdzv-id']!r}, not the job name {name!r}"
    lo, _, hi = f["--nnodes"].partition(":")
    lo, hi = int(lo), int(hi or lo)
    assert 1 <= lo <= hi
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(f["--nproc-per-node"]) == gpus == c["resources"]["requests"]["nvidia.com/gpu"], "one rank per GPU"
    run_dirs = {
        invocation_of(manifests, d).flags["--run-dir"]
        for d in (healthd_ds, find(manifests, "Deployment", "controller.yaml"))
    }
    assert run_dirs == {f["--run-dir"]}, f"{file}: run dirs differ: trainer {f['--run-dir']}, others {run_dirs}"
    vols = {v["name"]: v for v in pod.spec["volumes"]}
    mounts = {m["mountPath"]: vols[m["name"]] for m in c["volumeMounts"]}
    assert mounts["/dev/shm"].get("emptyDir", {}).get("medium") == "Memory", (
        f"{file}: /dev/shm must be an in-memory emptyDir"
    )
    pvc = find(manifests, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every node writes the run dir: the PVC must be ReadWriteMany"
    for d in (doc, healthd_ds, find(manifests, "Deployment", "controller.yaml")):
        (p,) = pods_of(d)
        (cc,) = p.spec["containers"]
        run_dir = invocation_of(manifests, d).flags["--run-dir"]
        pv = {v["name"]: v for v in p.spec["volumes"]}
        on_pvc = [
            m
            for m in cc["volumeMounts"]
            if run_dir.startswith(m["mountPath"].rstrip("/") + "/")
            and pv[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        ]
        assert on_pvc, f"{p.where}: run dir {run_dir} is not on the shared PVC {pvc['metadata']['name']}"
    assert f["--rdzv-endpoint"] in store_address(manifests), (
        f"{file}: rendezvous on {f['--rdzv-endpoint']}, not on the head-node store's Service (a training pod "
        "would hold the store: the one pod the job could not lose)"
    )
    assert f.get("--rdzv-backend", "c10d") == "c10d"
    if file == "jobset.yaml":
        rj = doc["spec"]["replicatedJobs"][0]
        job = rj["template"]["spec"]
        subdomain = doc["spec"]["network"].get("subdomain", name)
        assert doc["spec"]["network"]["enableDNSHostnames"] is True
        assert f["--rdzv-endpoint"] != f"{name}-{rj['name']}-0-0.{subdomain}:{RDZV_PORT}"
        assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == hi, (
            f"{file}: Job size != MAX of --nnodes"
        )
        assert pod.spec["restartPolicy"] == "Never"
        ignored = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "Ignore" and "onExitCodes" in r]
        assert any(
            r["onExitCodes"]["containerName"] == c["name"] and EXIT_NODE_EXCLUDED in r["onExitCodes"]["values"]
            for r in ignored
        ), f"{file}: exit {EXIT_NODE_EXCLUDED} (node excluded) must replace the pod without counting as a failure"
        assert doc["spec"]["failurePolicy"]["maxRestarts"] >= 1
        targets = set(doc["spec"]["successPolicy"]["targetReplicatedJobs"])
        assert targets <= {r["name"] for r in doc["spec"]["replicatedJobs"]}
    else:
        ep = doc["spec"]["elasticPolicy"]
        (worker,) = doc["spec"]["pytorchReplicaSpecs"].values()
        assert f["--rdzv-endpoint"] == f"{ep['rdzvHost']}:{ep['rdzvPort']}" and ep["rdzvPort"] == RDZV_PORT
        assert (ep["minReplicas"], ep["maxReplicas"]) == (lo, hi) and worker["replicas"] == hi
        assert ep["rdzvBackend"] == "c10d" and c["name"] == "pytorch"


def check_token(manifests: dict[str, list[dict]]) -> None:
    secret = find(manifests, "Secret", "secret.example.yaml")
    assert secret["metadata"]["name"] == TOKEN_SECRET
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    seen = 0
    for pod, c, inv in k8s_invocations(manifests):
        if inv.sub == "store":  # serves the rendezvous only; it holds no token and checks none
            continue
        vols = {v["name"]: v for v in pod.spec["volumes"]}
        token_paths = set()
        for m in c["volumeMounts"]:
            s = vols[m["name"]].get("secret")
            if s is None:
                continue
            assert s["secretName"] == TOKEN_SECRET, (
                f"{pod.where}: mounts secret {s['secretName']!r}, the job token is {TOKEN_SECRET!r}"
            )
            assert m.get("readOnly") is True
            for item in s["items"]:
                assert item["key"] in keys, (
                    f"{pod.where}: key {item['key']!r} is not in {TOKEN_SECRET} (has {sorted(keys)})"
                )
                token_paths.add(f"{m['mountPath'].rstrip('/')}/{item['path']}")
        token_file = inv.flags.get("--token-file", resolve_env(c, pod).get(TOKEN_ENV))
        assert token_file in token_paths, (
            f"{inv.where}: token file {token_file} is not where {TOKEN_SECRET} is mounted ({token_paths})"
        )
        seen += 1
    assert seen == len(all_pods(manifests)) - 1  # every pod but the store's


def all_checks(manifests: dict[str, list[dict]]) -> None:
    check_required_fields(manifests)
    check_kustomization(manifests)
    check_flags([inv for _, _, inv in k8s_invocations(manifests)])
    check_healthd(manifests)
    check_controller(manifests)
    check_store(manifests)
    check_trainer(manifests, "jobset.yaml")
    check_trainer(manifests, "pytorchjob.yaml")
    check_token(manifests)


# ---------------------------------------------------------------- tests: Kubernetes


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return load_manifests()


def test_expected_files_exist(manifests):
    assert set(manifests) >= {
        "jobset.yaml",
        "pytorchjob.yaml",
        "healthd-daemonset.yaml",
        "controller.yaml",
        "store.yaml",
        "secret.example.yaml",
        "kustomization.yaml",
    }
    for path in (SBATCH, CONTAINERFILE, DEPLOY / "README.md"):
        assert path.is_file(), path


def test_required_fields(manifests):
    check_required_fields(manifests)


def test_kustomization_lists_every_manifest(manifests):
    check_kustomization(manifests)
    text = (K8S / "kustomization.yaml").read_text()
    for name in NOT_IN_KUSTOMIZATION:
        assert name in text, f"kustomization.yaml should say why {name} is not listed"


def test_healthd_daemonset(manifests):
    check_healthd(manifests)


def test_controller_deployment_and_service(manifests):
    check_controller(manifests)


def test_store_deployment_and_service(manifests):
    check_store(manifests)


@pytest.mark.parametrize("file", ["jobset.yaml", "pytorchjob.yaml"])
def test_trainer_matches_healthd_controller_and_storage(manifests, file):
    check_trainer(manifests, file)


def test_token_secret_consistent(manifests):
    check_token(manifests)


def test_pytorchjob_is_marked_for_training_operator_v1():
    head = (K8S / "pytorchjob.yaml").read_text().split("apiVersion:")[0]
    assert "Training Operator v1" in head


def test_every_invocation_uses_known_flags(manifests):
    k8s = [inv for _, _, inv in k8s_invocations(manifests, resolved=False)]
    slurm = shell_invocations(SBATCH.read_text(), str(SBATCH.relative_to(ROOT)))
    readme = readme_invocations()
    assert sorted(i.sub for i in k8s) == ["controller", "healthd", "launch", "launch", "store"]
    assert sorted(i.sub for i in slurm) == ["controller", "healthd", "launch", "store"]
    assert readme, "deploy/README.md shows no stalwart command"
    check_flags(k8s + slurm + readme)


# Each mutation breaks exactly one cross-file convention; the full check must notice every one.
def _set_args(doc_getter, flag, value):
    def mutate(m):
        c = doc_getter(m)
        i = c["args"].index(flag)
        c["args"][i + 1] = value

    return mutate


def _launcher(m):
    return only_container(find(m, "JobSet"))


MUTATIONS = {
    "healthd hostPort": lambda m: only_container(find(m, "DaemonSet"))["ports"][0].update(hostPort=50061),
    "healthd bind": _set_args(lambda m: only_container(find(m, "DaemonSet")), "--bind", "0.0.0.0:50061"),
    "healthd liveness not grpc": lambda m: only_container(find(m, "DaemonSet")).update(
        livenessProbe={"tcpSocket": {"port": 50051}}
    ),
    "controller Service port": lambda m: find(m, "Service", "controller.yaml")["spec"]["ports"][0].update(port=50053),
    "controller liveness port": lambda m: only_container(find(m, "Deployment", "controller.yaml"))["livenessProbe"][
        "grpc"
    ].update(port=8080),
    "controller Service name": lambda m: find(m, "Service", "controller.yaml")["metadata"].update(name="controller"),
    "Service selects healthd": lambda m: find(m, "Service", "controller.yaml")["spec"].update(
        selector={"app.kubernetes.io/component": "healthd"}
    ),
    "jobset --controller": _set_args(_launcher, "--controller", "stalwart-controller:8080"),
    "jobset --healthd": _set_args(_launcher, "--healthd", "$(NODE_IP):50052"),
    "jobset rdzv port": _set_args(
        _launcher, "--rdzv-endpoint", "$(JOBSET_NAME)-$(REPLICATED_JOB)-0-0.$(JOBSET_NAME):29500"
    ),
    "jobset rdzv host": _set_args(_launcher, "--rdzv-endpoint", "$(JOBSET_NAME)-workers-1-0.$(JOBSET_NAME):29400"),
    "jobset store on training pod 0": _set_args(
        _launcher, "--rdzv-endpoint", "$(JOBSET_NAME)-$(REPLICATED_JOB)-0-0.$(JOBSET_NAME):29400"
    ),
    "jobset etcd backend without etcd": lambda m: _launcher(m)["args"].extend(["--rdzv-backend", "etcd-v2"]),
    "store bind port": _set_args(
        lambda m: only_container(find(m, "Deployment", "store.yaml")), "--bind", "0.0.0.0:29500"
    ),
    "store Service port": lambda m: find(m, "Service", "store.yaml")["spec"]["ports"][0].update(port=29500),
    "store two replicas": lambda m: find(m, "Deployment", "store.yaml")["spec"].update(replicas=2),
    "pytorchjob rdzv on worker 0": _set_args(
        lambda m: only_container(find(m, "PyTorchJob")), "--rdzv-endpoint", "$(JOB_NAME)-worker-0:29400"
    ),
    "jobset unknown flag": lambda m: _launcher(m)["args"].extend(["--standalone", "true"]),
    "jobset undefined env": _set_args(_launcher, "--rdzv-id", "$(JOB_ID)"),
    "jobset nproc != gpus": _set_args(_launcher, "--nproc-per-node", "4"),
    "jobset run dir": _set_args(_launcher, "--run-dir", "/workspace/runs/other"),
    "jobset parallelism": lambda m: find(m, "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"].update(
        parallelism=8
    ),
    "pytorchjob maxReplicas": lambda m: find(m, "PyTorchJob")["spec"]["elasticPolicy"].update(maxReplicas=8),
    "secret name in controller": lambda m: find(m, "Deployment", "controller.yaml")["spec"]["template"]["spec"][
        "volumes"
    ][1]["secret"].update(secretName="token"),
    "token file path": _set_args(
        lambda m: only_container(find(m, "Deployment", "controller.yaml")), "--token-file", "/etc/token"
    ),
    "kustomization misses a file": lambda m: m["kustomization.yaml"][0]["resources"].remove("controller.yaml"),
    "kustomization misses the store": lambda m: m["kustomization.yaml"][0]["resources"].remove("store.yaml"),
    "kustomization lists the example secret": lambda m: m["kustomization.yaml"][0]["resources"].append(
        "secret.example.yaml"
    ),
    "selector mismatch": lambda m: find(m, "DaemonSet")["spec"]["selector"]["matchLabels"].update(app="x"),
    "shm not memory": lambda m: find(m, "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "volumes"
    ][0].update(emptyDir={}),
}


def test_checks_pass_on_the_real_manifests(manifests):
    all_checks(manifests)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_checks_catch_mismatches(manifests, mutation):
    broken = copy.deepcopy(manifests)
    MUTATIONS[mutation](broken)
    with pytest.raises(AssertionError):
        all_checks(broken)


# ---------------------------------------------------------------- tests: Slurm


def sbatch_directives() -> dict[str, str]:
    out = {}
    for line in SBATCH.read_text().splitlines():
        m = re.match(r"#SBATCH\s+(--[\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def test_sbatch_is_valid_bash_with_the_conventions():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    d = sbatch_directives()
    assert d["--ntasks-per-node"] == "1" and d["--signal"] == "TERM@120" and "--requeue" in d and "--nodes" in d
    text = SBATCH.read_text()
    assert re.search(r'head=\$\(scontrol show hostnames "\$\{SLURM_JOB_NODELIST_HET_GROUP_0:-\}" \| head -n1\)', text)
    assert "#SBATCH hetjob" in text, "the store needs a head component that trains nothing"
    (launch,) = [i for i in shell_invocations(text, "sbatch") if i.sub == "launch"]
    assert launch.flags["--rdzv-id"] == "$SLURM_JOB_ID"
    assert launch.flags["--rdzv-endpoint"] == f"$head:{RDZV_PORT}"
    assert launch.flags["--nnodes"] == "$nnodes"
    lines = shell_logical_lines(text)
    (store_line,) = [x for x in lines if re.search(r"\bstalwart store\b", x) and "srun" in x]
    (launch_line,) = [x for x in lines if re.search(r"\bstalwart launch\b", x) and "srun" in x]
    assert "--het-group=0" in store_line and "--het-group=1" in launch_line, "the store must not run on a training node"
    assert int(launch.flags["--nproc-per-node"]) == int(d["--gpus-per-node"])
    by_sub = {i.sub: i for i in shell_invocations(text, "sbatch")}
    assert port_of(launch.flags["--healthd"]) == port_of(by_sub["healthd"].flags["--bind"])
    assert launch.flags["--controller"] == f"$head:{port_of(by_sub['controller'].flags['--grpc-bind'])}"
    assert port_of(by_sub["store"].flags["--bind"]) == port_of(launch.flags["--rdzv-endpoint"])
    assert str(EXIT_NODE_EXCLUDED) in text and "ExcNodeList" in text and "scontrol requeue" in text


FAKE_SRUN = r"""#!/bin/bash
# Drops srun's options; side services (stalwart healthd/controller) run once, the job step once per node.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
if [[ $1 == stalwart ]]; then exec "$@"; fi
pids=()
for node in $FAKE_NODES; do SLURMD_NODENAME=$node "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p"; c=$?; ((c > rc)) && rc=$c; done
exit $rc
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.log"
if [[ "$1 $2" == "show hostnames" && "$3" == "$FAKE_HEAD" ]]; then echo "$FAKE_HEAD";
elif [[ "$1 $2" == "show hostnames" && -n "$3" ]]; then printf '%s\n' $FAKE_NODES; fi
"""
FAKE_STALWART = r"""#!/bin/bash
echo "${SLURMD_NODENAME:-batch} $*" >> "$FAKE_LOG/stalwart.log"
if [[ $1 == launch ]]; then rc_var="FAKE_RC_$SLURMD_NODENAME"; exit "${!rc_var:-0}"; fi
exec sleep 30
"""


def run_sbatch(
    tmp_path: Path, rcs: dict[str, int], restart_count: int | None = None
) -> tuple[int, list[str], list[str], Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("stalwart", FAKE_STALWART)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (log / "scontrol.log").write_text("")
    env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FAKE_NODES": " ".join(rcs),
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "FAKE_HEAD": "head1",
        "SLURM_JOB_NODELIST": "head1,gpu[1-3]",
        "SLURM_JOB_NODELIST_HET_GROUP_0": "head1",
        "SLURM_JOB_NODELIST_HET_GROUP_1": "gpu[1-3]",
        "SLURM_JOB_ID_HET_GROUP_1": "4243",
        "SLURM_JOB_NAME": "stalwart",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "STALWART_RUN_DIR": str(tmp_path / "run"),
        "STALWART_MAX_REQUEUES": "5",
        **{f"FAKE_RC_{n}": str(rc) for n, rc in rcs.items()},
    }
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    proc = subprocess.run(
        ["bash", str(SBATCH), "debug"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    print(proc.stdout, proc.stderr)  # pytest shows it when an assertion below fails
    scontrol = (log / "scontrol.log").read_text().splitlines()
    stalwart = (log / "stalwart.log").read_text().splitlines()
    return proc.returncode, scontrol, stalwart, tmp_path / "run"


def test_sbatch_finished_job_is_not_requeued(tmp_path):
    rc, scontrol, stalwart, run = run_sbatch(tmp_path, {"gpu1": 0, "gpu2": 0, "gpu3": 0})
    assert rc == 0
    assert not [c for c in scontrol if c.startswith(("requeue", "update"))]
    launches = [line.split() for line in stalwart if " launch " in line]
    assert sorted(line[0] for line in launches) == ["gpu1", "gpu2", "gpu3"]
    _, flags = split_flags(["stalwart", *launches[0][1:]], "fake")
    assert (
        flags["--rdzv-endpoint"] == f"head1:{RDZV_PORT}" and flags["--rdzv-id"] == "4242" and flags["--nnodes"] == "3"
    )
    assert flags["--config"] == "debug" and flags["--controller"] == "head1:50052"
    assert {line.split()[1] for line in stalwart} == {"launch", "healthd", "controller", "store"}
    token = (run / "slurm" / "token").read_text().strip()
    assert len(token) == 64 and oct((run / "slurm" / "token").stat().st_mode & 0o777) == "0o600"


def test_sbatch_excludes_a_node_that_exited_93(tmp_path):
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    (tmp_path / "run" / "slurm" / "excluded_nodes").write_text("gpu9\n")  # from an earlier attempt
    rc, scontrol, _, _ = run_sbatch(tmp_path, {"gpu1": 137, "gpu2": EXIT_NODE_EXCLUDED, "gpu3": 137}, restart_count=1)
    assert rc != 0
    assert scontrol[-2:] == ["requeue 4242", "update JobId=4243 ExcNodeList=gpu2,gpu9"]  # the training component


def test_sbatch_requeues_other_failures_without_exclusion(tmp_path):
    rc, scontrol, _, _ = run_sbatch(tmp_path, {"gpu1": 1, "gpu2": 0})
    assert rc == 1
    assert scontrol[-1] == "requeue 4242" and not any("ExcNodeList" in c for c in scontrol)


def test_sbatch_stops_requeueing_after_the_limit(tmp_path):
    rc, scontrol, _, _ = run_sbatch(tmp_path, {"gpu1": 1}, restart_count=5)
    assert rc == 1
    assert not [c for c in scontrol if c.startswith("requeue")]


# ---------------------------------------------------------------- tests: container image


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and heredoc bodies attached."""
    out: list[tuple[str, str]] = []
    lines = CONTAINERFILE.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            body = []
            while lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        instr, _, args = line.strip().partition(" ")
        out.append((instr.upper(), args))
    return out


def test_containerfile():
    instrs = containerfile_instructions()
    names = [n for n, _ in instrs]
    args = dict(a.split("=", 1) for n, a in instrs if n == "ARG" and "=" in a)
    (base,) = [a for n, a in instrs if n == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    m = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda(\d+)\.\d+-cudnn\d+-(runtime|devel)", base)
    assert m, f"base image {base} is not a pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime tag"
    assert (int(m.group(1)), int(m.group(2))) >= (2, 11) and int(m.group(3)) >= 12, (
        "needs torch >= 2.11 built for CUDA >= 12"
    )
    runs = [(i, a) for i, (n, a) in enumerate(instrs) if n == "RUN"]
    (pin,) = [i for i, a in runs if "torch==" in a and "constraint" in a]
    (install,) = [(i, a) for i, a in runs if re.search(r"pip install .*/opt/stalwart/src", a)]
    assert pin < install[0], "torch must be pinned before the project is installed"
    assert (
        "--constraint /etc/stalwart-torch-constraint.txt" in install[1]
        and "/etc/stalwart-torch-constraint.txt" in instrs[pin][1]
    )
    copy_src = [i for i, (n, a) in enumerate(instrs) if n == "COPY" and a.split()[0] == "."]
    assert copy_src and copy_src[0] < install[0]
    users = [(i, a) for i, (n, a) in enumerate(instrs) if n == "USER"]
    assert users and users[-1][1].split(":")[0] not in ("root", "0") and users[-1][0] > install[0], "runs as non-root"
    assert users[-1][1].split(":")[0] == "1000", "uid 1000 is the runAsUser of the Kubernetes manifests"
    assert names[-2:] == ["ENTRYPOINT", "CMD"] and yaml.safe_load(instrs[-2][1]) == ["stalwart"]
    assert "HEALTHCHECK" not in names
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore, "the build context must not ship the local venv (CPU torch)"


def test_readme_covers_every_deploy_file():
    text = (DEPLOY / "README.md").read_text()
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"]
    missing = [f for f in files if Path(f).name not in text]
    assert not missing, f"deploy/README.md does not mention {missing}"
