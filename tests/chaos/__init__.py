"""The fault suite: a workload run against real Baton processes while one
fault is injected, then the books are checked against the store.

`make chaos` runs every scenario at full scale and prints the table;
`make test` runs the short version of each.
"""
