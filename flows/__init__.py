"""Prefect wiring for crossmodal: flows, deployments and schedules. No ML logic lives here."""
