"""The `dpserve` command line (`cluster.cli`) and the DP+EP cluster simulator (`cluster.sim`)."""
