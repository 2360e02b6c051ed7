"""A fine-tuned model after its run: packaged as an MLflow Model, registered, served and monitored."""
