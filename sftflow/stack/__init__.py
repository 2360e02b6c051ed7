"""The local Prefect and MLflow servers, the Prefect deployments on them, and the fence on runs a deployment starts."""
