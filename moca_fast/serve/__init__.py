"""`moca-fast serve`: MocaEmbedder behind HTTP, in OpenAI's /v1/embeddings shape, with dynamic token-budget batching.

One job per module: settings (the limits and options), parsing (a request body -> inputs, or a 4xx naming the
item), inputs (image sources and the CPU work before the model: decoding, patchifying, token limits), batcher (the
bounded queue and the worker that packs many requests' inputs into one forward), metrics (Prometheus), app
(FastAPI routes, admission, graceful shutdown under uvicorn). FastAPI, uvicorn and prometheus-client are the
optional `serve` extra, imported only when the server runs.
"""
