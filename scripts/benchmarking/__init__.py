"""The pieces of ``scripts/benchmark.py`` (one module per row family) and what the benchmark scripts share.

:mod:`.measurement` timing and memory (also ``benchmark_grid_memory.py``'s), :mod:`.workload` the networks,
plans and data every row uses, :mod:`.encoder_row`, :mod:`.train_step_row`, :mod:`.grid_inference_row`,
:mod:`.predict_volume_row` the rows, :mod:`.report` the table.
"""
