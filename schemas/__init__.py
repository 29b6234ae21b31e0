"""JSON Schemas of wsicell's configuration and cell store (installed as ``wsicell.schemas``)."""
