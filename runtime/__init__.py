"""The trainer process: config, job plan, train loop, train state, optimizers, metrics, data, faults."""
