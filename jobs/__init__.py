"""Ray entry points: thin wiring of Ray Data / Train and MLflow around `comfusion`."""
