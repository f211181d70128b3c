"""The router: gRPC front door, validation, tokenizer, routing policy, token streaming."""
