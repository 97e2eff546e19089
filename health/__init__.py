"""Node health daemon, job controller, SDC and straggler detection."""
