"""Pseudo-masks from CAMs: normalisation and CVS, PPMG, the dense CRF (host and JAX), generation, rough masks."""
