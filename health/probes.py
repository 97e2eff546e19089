"""Node probes: GPUs through NVML, the host through psutil, and an opt-in fault-injection probe.

Probes never raise: a probe that cannot look (no driver, a query the GPU does not support) says so
in its report, because the daemon that calls them must outlive every GPU it watches.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

# XIDs that mean the GPU (or its memory / links) needs a reset or replacement; the rest (13, 31, 43,
# ...) are usually application faults and are reported as warnings. From NVIDIA's XID catalogue.
FATAL_XIDS = frozenset(
    {48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 109, 119, 120, 121, 136, 140, 143, 144, 145, 146, 154, 155}
)

FAULT_INJECTION_ENV = "STALWART_FAULT_INJECTION"
FAULT_GPU_FILE_ENV = "STALWART_FAULT_GPU"


@dataclass(frozen=True)
class GpuIssue:
    gpu: int
    # xid, ecc_uncorrectable, row_remap_failure, row_remap_pending, retired_pages_pending, lost, throttle, pcie_link
    kind: str
    fatal: bool
    code: int = 0
    detail: str = ""


@dataclass
class GpuInfo:
    index: int
    name: str = ""
    uuid: str = ""
    issues: list[GpuIssue] = field(default_factory=list)


@dataclass
class GpuReport:
    present: bool
    reason: str = ""
    gpus: list[GpuInfo] = field(default_factory=list)

    def issues(self) -> list[GpuIssue]:
        return [issue for gpu in self.gpus for issue in gpu.issues]

    def fatal(self) -> list[GpuIssue]:
        return [issue for issue in self.issues() if issue.fatal]


def _nvml() -> Any:
    import pynvml

    return pynvml


class GpuProbe:
    """Per-GPU health from NVML: XID events, ECC, row remapping / page retirement, throttling, PCIe.

    XIDs arrive through an NVML event set registered once per GPU for critical XID events; each
    ``probe()`` drains it without blocking, and a fatal XID stays reported until the daemon restarts
    (the GPU needs a reset either way).
    """

    def __init__(self, expected_gpus: int | None = None) -> None:
        self.expected_gpus = expected_gpus
        self._lock = threading.Lock()
        self._initialized = False
        self._unavailable = ""
        self._event_set: Any = None
        self._sticky: dict[int, list[GpuIssue]] = {}

    def _init(self) -> None:
        if self._initialized or self._unavailable:
            return
        try:
            nv = _nvml()
            nv.nvmlInit()
        except ImportError:
            self._unavailable = "nvidia-ml-py (pynvml) is not installed"
            return
        except Exception as e:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self._unavailable = f"NVML unavailable: {e}"
            return
        self._initialized = True
        try:
            self._event_set = nv.nvmlEventSetCreate()
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                try:
                    nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, self._event_set)
                except nv.NVMLError as e:
                    log.warning("GPU %d: XID events not available (%s); relying on ECC/row-remap queries", i, e)
        except Exception as e:
            log.warning("NVML event set unavailable (%s); XID events will not be seen", e)
            self._event_set = None

    def probe(self) -> GpuReport:
        with self._lock:
            try:
                return self._probe()
            except Exception as e:  # a probe must never take the daemon down
                log.exception("GPU probe failed")
                return GpuReport(present=self._initialized, reason=f"probe error: {e}")

    def _probe(self) -> GpuReport:
        self._init()
        if not self._initialized:
            return GpuReport(present=False, reason=self._unavailable)
        nv = _nvml()
        count = nv.nvmlDeviceGetCount()
        report = GpuReport(present=count > 0, reason="" if count else "NVML found no GPU")
        self._drain_xids(nv)
        for i in range(count):
            report.gpus.append(self._probe_one(nv, i))
        if self.expected_gpus is not None and count < self.expected_gpus:
            missing = GpuInfo(
                index=count,
                issues=[
                    GpuIssue(
                        count,
                        "lost",
                        True,
                        self.expected_gpus - count,
                        f"NVML sees {count} GPUs, expected {self.expected_gpus}",
                    )
                ],
            )
            report.gpus.append(missing)
        return report

    def _drain_xids(self, nv: Any) -> None:
        if self._event_set is None:
            return
        while True:
            try:
                data = nv.nvmlEventSetWait_v2(self._event_set, 0)
            except nv.NVMLError_Timeout:
                return
            except nv.NVMLError as e:
                log.warning("reading NVML events failed: %s", e)
                return
            code = int(data.eventData)
            index = self._index_of(nv, data.device)
            issue = GpuIssue(index, "xid", code in FATAL_XIDS, code, f"XID {code}")
            self._sticky.setdefault(index, []).append(issue)

    @staticmethod
    def _index_of(nv: Any, handle: Any) -> int:
        try:
            return int(nv.nvmlDeviceGetIndex(handle))
        except Exception:
            return -1

    def _probe_one(self, nv: Any, index: int) -> GpuInfo:
        info = GpuInfo(index=index)
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            info.name = _text(nv.nvmlDeviceGetName(handle))
            info.uuid = _text(nv.nvmlDeviceGetUUID(handle))
        except nv.NVMLError as e:
            info.issues.append(GpuIssue(index, "lost", True, 0, f"cannot reach the GPU: {e}"))
            return info
        info.issues.extend(self._sticky.get(index, []))
        info.issues.extend(_optional(index, lambda: _ecc_issues(nv, handle, index)))
        info.issues.extend(_optional(index, lambda: _remap_issues(nv, handle, index)))
        info.issues.extend(_optional(index, lambda: _retired_page_issues(nv, handle, index)))
        info.issues.extend(_optional(index, lambda: _throttle_issues(nv, handle, index)))
        info.issues.extend(_optional(index, lambda: _pcie_issues(nv, handle, index)))
        return info


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(index: int, query: Any) -> list[GpuIssue]:
    """Run one NVML query family; a GPU that does not support it reports nothing, not an error."""
    nv = _nvml()
    try:
        return query()
    except (nv.NVMLError_NotSupported, nv.NVMLError_NoPermission):
        return []
    except nv.NVMLError_GpuIsLost as e:
        return [GpuIssue(index, "lost", True, 0, f"GPU lost: {e}")]
    except nv.NVMLError as e:
        log.debug("NVML query failed: %s", e)
        return []


def _ecc_issues(nv: Any, handle: Any, index: int) -> list[GpuIssue]:
    count = int(nv.nvmlDeviceGetTotalEccErrors(handle, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC))
    return (
        [GpuIssue(index, "ecc_uncorrectable", True, count, f"{count} uncorrectable ECC errors since the last reset")]
        if count
        else []
    )


def _remap_issues(nv: Any, handle: Any, index: int) -> list[GpuIssue]:
    _corr, unc, pending, failed = nv.nvmlDeviceGetRemappedRows(handle)
    issues = []
    if failed:
        issues.append(
            GpuIssue(index, "row_remap_failure", True, int(unc), "row remapping failed: the GPU needs replacement")
        )
    if pending:
        issues.append(GpuIssue(index, "row_remap_pending", True, int(unc), "row remap pending: the GPU needs a reset"))
    return issues


def _retired_page_issues(nv: Any, handle: Any, index: int) -> list[GpuIssue]:
    pending = nv.nvmlDeviceGetRetiredPagesPendingStatus(handle)
    return (
        [GpuIssue(index, "retired_pages_pending", True, 1, "page retirement pending: the GPU needs a reset")]
        if pending
        else []
    )


_THROTTLE_NAMES = {
    "nvmlClocksThrottleReasonHwSlowdown": "hw_slowdown",
    "nvmlClocksThrottleReasonHwThermalSlowdown": "hw_thermal",
    "nvmlClocksThrottleReasonSwThermalSlowdown": "sw_thermal",
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": "power_brake",
}


def _throttle_issues(nv: Any, handle: Any, index: int) -> list[GpuIssue]:
    reasons = int(nv.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
    active = [name for attr, name in _THROTTLE_NAMES.items() if reasons & int(getattr(nv, attr, 0))]
    return [GpuIssue(index, "throttle", False, reasons, ",".join(active))] if active else []


def _pcie_issues(nv: Any, handle: Any, index: int) -> list[GpuIssue]:
    # Link generation drops at idle for power saving, so only a narrower link is a finding.
    width, max_width = int(nv.nvmlDeviceGetCurrPcieLinkWidth(handle)), int(nv.nvmlDeviceGetMaxPcieLinkWidth(handle))
    if width < max_width:
        gen, max_gen = (
            int(nv.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
            int(nv.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
        )
        return [GpuIssue(index, "pcie_link", False, width, f"PCIe x{width} gen{gen} (max x{max_width} gen{max_gen})")]
    return []


@dataclass
class HostReport:
    mem_available_bytes: int
    disk_free_bytes: int
    alive: dict[int, bool]


class HostProbe:
    """Memory, disk space under ``path`` and which of the given pids still run (zombies count as dead)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def probe(self, pids: list[int] | tuple[int, ...] = ()) -> HostReport:
        try:
            disk_free = int(psutil.disk_usage(str(self.path)).free)
        except OSError:
            disk_free = -1
        return HostReport(int(psutil.virtual_memory().available), disk_free, {pid: pid_alive(pid) for pid in pids})


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


class FaultInjectionProbe:
    """Reports a GPU fault described in a JSON file, for chaos tests without broken hardware.

    The file (``$STALWART_FAULT_GPU`` or ``RUN/faults/gpu-<node>.json``) holds e.g.
    ``{"gpu": 0, "fault": "xid", "code": 79}``. Inert unless ``STALWART_FAULT_INJECTION=1`` is set in
    the daemon's environment, so a stray file on a production node does nothing.
    """

    def __init__(self, run_dir: str | Path, node: str) -> None:
        self.enabled = os.environ.get(FAULT_INJECTION_ENV) == "1"
        self.path = Path(os.environ.get(FAULT_GPU_FILE_ENV) or Path(run_dir) / "faults" / f"gpu-{node}.json")

    def probe(self) -> list[GpuIssue]:
        if not self.enabled:
            return []
        try:
            spec = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable fault file %s: %s", self.path, e)
            return []
        specs = spec if isinstance(spec, list) else [spec]
        issues = []
        for item in specs:
            try:
                kind = str(item.get("fault", "xid"))
                code = int(item.get("code", 0))
                fatal = bool(item.get("fatal", kind != "xid" or code in FATAL_XIDS))
                issues.append(
                    GpuIssue(int(item.get("gpu", 0)), kind, fatal, code, f"injected {kind} {code} from {self.path}")
                )
            except (AttributeError, TypeError, ValueError) as e:
                log.warning("ignoring malformed fault spec %r in %s: %s", item, self.path, e)
        return issues
