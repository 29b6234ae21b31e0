"""From labels to answers: cell-type proportions of slides and regions, slide classes,
and the scores that measure results against annotations.
"""
