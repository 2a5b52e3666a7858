"""Libraries of the standalone tools: weight conversion, the MXNet reader, metrics."""
