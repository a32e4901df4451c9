"""`moca-fast serve`: MocaEmbedder behind HTTP, in OpenAI's /v1/embeddings shape, with dynamic token-budget batching.

One job per module: settings (the limits and options, and the command's flags checked before the model loads),
schemas (the pydantic request and response bodies FastAPI validates and documents), parsing (a validated request ->
inputs and what to answer, or a 4xx naming the item), inputs (image sources and the CPU work before the model:
pixel and token limits from headers and lengths, decoding, patchifying, truncation), batcher (the bounded queue and
the worker that packs many requests' inputs into one forward), encoding (the response body: precisions, base64,
multi-vectors, orjson), metrics (Prometheus), app (FastAPI routes, errors, auth, CORS, admission, graceful shutdown
under uvicorn). FastAPI, uvicorn, pydantic, orjson, httpx and the Prometheus packages are the optional `serve`
extra, imported only when the server runs.
"""
