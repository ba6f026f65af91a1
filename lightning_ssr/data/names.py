"""The names of what the benchmarks offer (no torch import: the command line lists them in its help)."""

__all__ = ["DATASETS", "PROTOCOLS", "SCENARIOS"]

#: Datasets :func:`~lightning_ssr.data.make_benchmark` knows.
DATASETS: tuple[str, ...] = ("digits", "fmnist", "mnist")
#: How the data is divided into tasks.
PROTOCOLS: tuple[str, ...] = ("split", "permuted")
#: What the model is told and must tell apart (van de Ven & Tolias 2019).
SCENARIOS: tuple[str, ...] = ("task", "domain", "class")
