"""retd generated protobuf and gRPC code for the retd.v1 contract (see decoder.proto)."""
