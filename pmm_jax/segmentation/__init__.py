"""The segmenter: building and training it (losses, optimiser, starting weights), its runs,
the checkpoint each run uses, and test-time inference."""
