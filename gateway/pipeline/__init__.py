"""The pipeline: plugins around routing. It takes a ``RequestContext`` and returns an
``Answer``; it imports nothing from the doors or the HTTP layer.
"""

from gateway.pipeline.answer import Answer, Embeddings, Listed, Streamed, Whole, route_headers
from gateway.pipeline.core import ESCALATED, Pipeline
from gateway.pipeline.loading import load_plugins

__all__ = ["ESCALATED", "Answer", "Embeddings", "Listed", "Pipeline", "Streamed", "Whole",
           "load_plugins", "route_headers"]
