"""The paper's Table 2 on the phantom: the `speckle-reproduce` command, the classical speckle
filters it compares against, tuning, statistics over seeds and images, tables."""
