"""Looking at finished runs: side-by-side comparison and screenshots of the Prefect and MLflow UIs."""
