"""Server-side federated learning: aggregation of client updates and server optimizers."""
