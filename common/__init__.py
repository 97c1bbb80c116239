"""Shared plumbing: the command line (`cli`), constants, safe file I/O, run fingerprints, model resolution (offline too), model cards and the data validator."""
