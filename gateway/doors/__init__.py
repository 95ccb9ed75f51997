"""The front doors: one module per API a client speaks. Each parses its wire format into a
``RequestContext``, asks the pipeline, and encodes the answer back; none reaches past the
pipeline.
"""
