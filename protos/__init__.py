"""Generated gRPC stubs of the versioned wire API (`make protos` regenerates them)."""
