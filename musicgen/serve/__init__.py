"""The HTTP service (`musicgen serve`): jobs, continuous batching, streaming, a web page."""
