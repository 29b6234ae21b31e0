"""From pixels to nuclei: tissue detection, stain normalisation and separation, nuclei.

Pure kernels on arrays (:mod:`~wsicell.segmentation.tissue`,
:mod:`~wsicell.segmentation.stain`, :mod:`~wsicell.segmentation.nuclei`) and their use on
one plain image file (:mod:`~wsicell.segmentation.fov`).  Nothing here knows about Dask or
the cell store.
"""
