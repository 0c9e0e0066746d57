"""Ray entry points: thin wiring of Ray Data / Train / Tune and MLflow around `comfusion`."""
