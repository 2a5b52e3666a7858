"""The segmenter: the PUS loss and test-time inference."""
