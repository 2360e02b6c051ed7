"""The `sftflow` command line and the terminal it prints to. The top layer: nothing else imports it."""
