"""Running a deployment without one: the in-process chain, baselines, the cost model, feeding data and reporting,
and the local multi-process deployment."""
