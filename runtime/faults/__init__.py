"""Fault injection for chaos tests and the demo: one plan, one injector, off by default."""

from stalwart.runtime.faults.plan import FaultInjectionDisabled, FaultKind, FaultPlan, FaultSpec

__all__ = ["FaultInjectionDisabled", "FaultKind", "FaultPlan", "FaultSpec"]
