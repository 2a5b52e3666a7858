"""Files of a run: atomic writers and formats, workdir paths."""
