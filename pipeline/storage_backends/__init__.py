"""Extra storage backends, one module per URI scheme (see `pipeline/storage.py`): `memory.py` is the example."""
