"""Benchmarks of halp_fx against eager SGD, compiled SGD and a torchhalp-style eager HALP; see ``run.py``."""
