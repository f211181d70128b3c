"""pdserve's engine: model loading, the paged-KV model runner, sampling, the KV transport.

Ground floor: knows nothing about Ray or gRPC; the workers and the router build on it.
"""
