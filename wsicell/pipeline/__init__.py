"""Orchestration: the Dask-distributed ingest of slides, the training run, labelling and
the whole prediction run, and the segmentation of plain image files.  The layer the
command line and the public API call.
"""
