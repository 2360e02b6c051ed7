"""sftflow: workflow-orchestrated supervised fine-tuning."""
