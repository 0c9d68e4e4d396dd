"""Federated simulation: data sets, partitioners and the simulation engine."""
