"""Pictures a pathologist can check: figures drawn with matplotlib's object API (no global
backend, no pyplot state) and the self-contained HTML report.
"""
