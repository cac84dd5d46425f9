"""Generated protobuf and gRPC code for the fedsync.v1 wire protocol (see proto/). Do not edit:
run `make proto` after changing a .proto file; tests/test_proto_fresh.py fails while it is stale."""
