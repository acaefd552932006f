"""`asympo study`: the staleness study, a grid of lag-runtime runs summarised in a table and plots."""
