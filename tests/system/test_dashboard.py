"""The controller's dashboard in headless Chromium, against a real `stalwart controller` and `stalwart healthd`.

The page must show what ``/api/state`` says, then follow a dead-GPU fault to UNHEALTHY/EXCLUDED by
polling alone (no reload), with the fault in the incident list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import full_page_screenshot
from controller_helpers import ROOT, api_state, node_of, spawn_rank
from incident_logs import chaos_log, write_run
from polling import free_port, wait_for

from stalwart.events import EventKind, EventLog
from stalwart.goodput.accounting import CATEGORIES
from stalwart.health.probes import FAULT_INJECTION_ENV


def start(cmd: list[str], expect: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a ``stalwart`` subcommand; return it and the first line of its output (which names its address)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stalwart", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )
    line = proc.stdout.readline()
    assert expect in line, f"{cmd[0]} did not start (got {line!r}, exit {proc.poll()})"
    return proc, line


def a_finished_stretch_of_training(run_dir: Path) -> None:
    """Real trainer events and two real checkpoints (step 1 verified), for the goodput and checkpoint panels."""
    import torch

    from stalwart.checkpoint.manager import CheckpointManager

    log = EventLog(run_dir, role="trainer", rank=0, node=0)
    log.emit(EventKind.JOB_START, config={"checkpoint": {"enabled": True, "url": ""}}, steps=10)
    log.emit(EventKind.INIT_DONE, seconds=0.2)
    for step in (1, 2, 3):
        log.emit(EventKind.STEP_BEGIN, step=step)
        time.sleep(0.1)
        log.emit(EventKind.STEP_END, step=step, step_seconds=0.1, data_seconds=0.01, tokens=64)
    log.close()
    manager = CheckpointManager(str(run_dir / "checkpoints"))
    manager.save(1, {"w": torch.ones(1024)}, verified=True)
    manager.save(2, {"w": torch.zeros(2048)})
    manager.close()


# The page re-renders its panels on every poll, so element handles go stale between two WebDriver calls.
# Everything the test reads is taken in one script run, which JavaScript's single thread makes atomic.
PAGE_SNAPSHOT_JS = """
const all = (sel, root = document) => [...root.querySelectorAll(sel)];
const text = (root, cls) => { const e = root.querySelector("." + cls); return e ? e.textContent : null; };
return {
  polls: Number(document.body.dataset.polls),
  step: document.getElementById("step").textContent,
  runDir: document.getElementById("job-run-dir").textContent,
  goodputRatio: document.getElementById("goodput-ratio").textContent,
  badput: Object.fromEntries(
    all("#badput-body tr[data-category]").map((r) => [r.dataset.category, text(r, "seconds")])),
  checkpoints: all("#checkpoints-body tr[data-step]").map((r) => [Number(r.dataset.step), r.dataset.verified]),
  incidents: all("tr[data-incident]").map((r) => ({
    kind: r.dataset.incident, target: r.dataset.target, planned: r.dataset.planned === "true",
    table: r.closest("table").id, summary: text(r, "summary"),
    stackLink: (r.querySelector(".links a.stack-dump") || {}).href || null,
    consequences: all("li[data-consequence]", r).map((li) => [li.dataset.consequence, li.textContent]),
  })),
  markers: all("#timeline [data-marker]").map((m) => Number(m.dataset.marker)),
  nodes: Object.fromEntries(all(".node[data-node]").map((n) => [n.dataset.node, {
    state: n.dataset.state,
    fatalGpus: all("[data-gpu][data-fatal=true]", n).map((g) => g.dataset.gpu),
    ranks: Object.fromEntries(all("tr[data-rank]", n).map((r) => [r.dataset.rank, {
      step: text(r, "step"), stepSeconds: text(r, "step-seconds"), stragglerScore: text(r, "straggler-score")}])),
  }])),
  lastState: window.__lastState || null,
  sameDocument: window.__sameDocument === true,
};
"""


def page(driver) -> dict:
    return driver.execute_script(PAGE_SNAPSHOT_JS)


def node_state(driver, node: str) -> str | None:
    return page(driver)["nodes"].get(node, {}).get("state")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dashboard_follows_the_controller_live(chromium, tmp_path, token_file):  # noqa: F811
    a_finished_stretch_of_training(tmp_path)
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = []
    try:
        controller, _ = start(
            [
                "controller",
                "--run-dir",
                str(tmp_path),
                "--grpc-bind",
                grpc_addr,
                "--http-bind",
                http_addr,
                "--token-file",
                str(token_file),
                "--refresh-interval-s",
                "0.5",
            ],
            "controller listening on",
        )
        procs.append(controller)
        env = dict(os.environ, **{FAULT_INJECTION_ENV: "1"})
        healthd, line = start(
            [
                "healthd",
                "--run-dir",
                str(tmp_path),
                "--token-file",
                str(token_file),
                "--node",
                "0",
                "--controller",
                grpc_addr,
                "--probe-interval-s",
                "0.2",
                "--report-interval-s",
                "0.3",
                "--floor-s",
                "30",
            ],
            "listening on",
            env,
        )
        procs.append(healthd)
        procs.append(spawn_rank(line.split("listening on", 1)[1].strip(), grpc_addr, 0, 0, 0.05))

        chromium.get(f"http://{http_addr}/")
        chromium.execute_script("window.__sameDocument = true")
        wait_for(
            lambda: (
                (n := page(chromium)["nodes"].get("0"))
                and n["state"] == "HEALTHY"
                and "0" in n["ranks"]
                and page(chromium)["checkpoints"]
            ),
            30,
            "node 0 HEALTHY with rank 0 on the page",
        )
        wait_for(lambda: page(chromium)["step"].isdigit() and int(page(chromium)["step"]) > 0, 10, "a step count")

        # Slow-moving numbers: the page shows what /api/state says now.
        state, shown = api_state(http_addr), page(chromium)
        assert shown["runDir"] == state["job"]["run_dir"]
        assert (
            sorted(map(tuple, shown["checkpoints"]))
            == [(c["step"], str(c["verified"]).lower()) for c in state["checkpoints"]]
            == [(1, "true"), (2, "false")]
        )
        assert shown["nodes"]["0"]["state"] == node_of(state, "0")["state"] == "HEALTHY"
        # Fast-moving numbers (ages, step, rate): the page shows exactly the state it last fetched.
        rank = node_of(shown["lastState"], "0")["ranks"][0]
        row = shown["nodes"]["0"]["ranks"]["0"]
        assert row["step"] == str(rank["step"])
        assert row["stepSeconds"] == f"{rank['step_seconds']:.3f}"
        assert row["stragglerScore"].startswith(f"{rank['straggler_score']:.2f}")
        assert rank["step"] > 0 and shown["lastState"]["job"] == state["job"]
        fetched = shown["lastState"]["goodput"]  # the ratio moves fast early in a run
        assert shown["goodputRatio"] == f"{100 * fetched['ratio']:.2f} %"
        assert shown["badput"] == {c: f"{fetched['badput_s'][c]:.2f}" for c in CATEGORIES}
        full_page_screenshot(chromium, tmp_path / "dashboard-healthy.png")

        polls = page(chromium)["polls"]
        (tmp_path / "faults").mkdir(exist_ok=True)
        (tmp_path / "faults" / "gpu-0.json").write_text(json.dumps({"gpu": 0, "fault": "xid", "code": 79}))
        t0 = time.monotonic()
        wait_for(
            lambda: node_state(chromium, "0") in ("UNHEALTHY", "EXCLUDED"),
            20,
            "node 0 UNHEALTHY or EXCLUDED on the page",
        )
        print(
            f"\ninjected XID 79 -> dashboard shows node 0 {node_state(chromium, '0')} after "
            f"{time.monotonic() - t0:.2f}s"
        )
        shown = page(chromium)
        assert shown["sameDocument"], "the page reloaded"
        assert shown["polls"] > polls
        wait_for(lambda: "0" in page(chromium)["nodes"]["0"]["fatalGpus"], 10, "the dead GPU marked fatal")
        wait_for(lambda: [i["kind"] for i in page(chromium)["incidents"]] == ["gpu_fault"], 10, "the GPU incident")
        (gpu,) = page(chromium)["incidents"]
        (api_gpu,) = api_state(http_addr)["incidents"]
        assert gpu["summary"] == api_gpu["summary"]  # the sentence is the report's, shown as it is
        assert gpu["summary"].startswith("GPU node0 gpu0 failed (xid 79); found by healthd on node0 after")
        assert ("kill", "healthd on node0 killed rank 0") in [(a, t[9:]) for a, t in gpu["consequences"]]
        assert node_of(api_state(http_addr), "0")["state"] in ("UNHEALTHY", "EXCLUDED")
        shot = full_page_screenshot(chromium, tmp_path / "dashboard-fault.png")
        assert shot.stat().st_size > 20_000
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dashboard_tells_each_faults_story_with_a_working_stack_link(chromium, tmp_path, token_file):  # noqa: F811
    """The demo's chaos plan as its run logs it: one row per fault, in words, the preemption apart,
    every incident on the timeline, and the hang's stack dump one click away."""
    health = tmp_path / "health"
    health.mkdir()
    log = chaos_log(str(health))
    write_run(tmp_path, log)
    for stacks in (e["detail"]["stacks"] for e in log.events if e.get("fault") in ("hang", "hang_blocked")):
        for path in stacks:
            rank = path.rsplit("rank", 1)[1].removesuffix(".txt")
            Path(path).write_text(
                f"# healthd stack dump: rank {rank}\nThread 0x1 (idle): MainThread\n    wait (gloo)\n"
            )
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    controller, _ = start(
        [
            "controller",
            "--run-dir",
            str(tmp_path),
            "--grpc-bind",
            grpc_addr,
            "--http-bind",
            http_addr,
            "--token-file",
            str(token_file),
            "--refresh-interval-s",
            "0.5",
        ],
        "controller listening on",
    )
    try:
        chromium.get(f"http://{http_addr}/")
        wait_for(lambda: len(page(chromium)["incidents"]) == 7, 30, "the seven incidents on the page")
        shown, state = page(chromium), api_state(http_addr)
        faults = [i for i in shown["incidents"] if not i["planned"]]
        assert sorted((i["kind"], i["target"]) for i in faults) == sorted(
            [
                ("rank_died", "rank 5"),
                ("hang", "rank 2"),
                ("sdc", "suspects: ranks 1, 3"),
                ("gpu_fault", "node1 gpu0"),
                ("storage_damage", "checkpoint step 20"),
                ("node_lost", "node node2"),
            ]
        )
        assert {i["table"] for i in faults} == {"faults"}
        [planned] = [i for i in shown["incidents"] if i["planned"]]
        assert (planned["kind"], planned["table"]) == ("preemption", "planned")
        assert sorted(shown["markers"]) == list(range(1, 8))  # every incident on the timeline
        by_kind = {i["kind"]: i for i in shown["incidents"]}
        for i in state["incidents"]:  # the report's sentence, not raw JSON
            assert by_kind[i["kind"]]["summary"] == i["summary"] and "{" not in i["summary"]
        hang = by_kind["hang"]
        assert hang["summary"].startswith(
            "rank 2 stopped making progress in STEP (process stopped (SIGSTOP or a debugger)); found by healthd on "
            "node0 after 10.5 s; stacks: stacks-"
        )
        assert ["blocked", "kill", "killed", "restart", "reload"] == list(
            dict.fromkeys(a for a, _ in hang["consequences"] if a != "stacks")
        )
        assert hang["stackLink"].endswith("-rank2.txt")
        full_page_screenshot(chromium, tmp_path / "dashboard-incidents.png")
        chromium.get(hang["stackLink"])  # the link works: the browser gets healthd's dump of the culprit
        assert "healthd stack dump: rank 2" in chromium.find_element("tag name", "body").text
        assert http_status(f"http://{http_addr}/stacks/..%2Fevents%2Fx.jsonl") == 404  # nothing else is served
    finally:
        controller.kill()
        controller.wait()


def http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def test_dashboard_is_self_contained():
    page = (ROOT / "health" / "dashboard" / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page and "src=" not in page
    assert "innerHTML" not in page  # state strings are rendered as text, never as markup


@pytest.fixture(autouse=True)
def _no_leftover_fault_env(monkeypatch):
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)  # only the healthd subprocess gets it
