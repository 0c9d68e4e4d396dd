"""The data of a run, the same in both runtimes: data sets, partitioners, a run's examples and shards."""
