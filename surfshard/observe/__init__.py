"""What an operator sees of a node: Prometheus metrics, the live status
page, and its logs."""
