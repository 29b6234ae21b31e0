"""Reading and writing: slide files, the Zarr cell store, and exports of its cells.

The bottom layer of the pipeline.  :mod:`~wsicell.io.slide` reads slides and plain images on
the reference grid; :mod:`~wsicell.io.store` is the one owner of the cell store's layout
(groups, arrays, attributes, status constants); :mod:`~wsicell.io.staging` holds ingest's
working files beside the store; :mod:`~wsicell.io.export` writes the cells as CSV, Parquet
or QuPath GeoJSON.
"""
