"""The embedded digits benchmark (data, FD-digits metric, shipped teacher and classifier)."""
