"""`pdserve bench`: a load generator and report, for pdserve (gRPC) and OpenAI-compatible servers."""
