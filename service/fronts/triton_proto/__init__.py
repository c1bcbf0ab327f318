"""Triton's gRPC protocol, vendored: grpc_service.proto and model_config.proto exactly as
triton-inference-server/common has them (protobuf/, commit 83adf7cf88a2, 2026-07-23; BSD-3-Clause,
NVIDIA's license header kept in each file), and the modules `make proto` generates from them
(grpcio-tools 1.81.1: protobuf gencode 6.33.5, so protobuf ≥ 6.33.5 at run time; grpcio ≥ 1.81.1).

Why Triton's files and not a proto of our own or KServe's grpc_predict_v2.proto: a gRPC client finds
a method by its full name (`/inference.GRPCInferenceService/ModelInfer`) and reads a message by its
field numbers, so tritonclient and kserve work unchanged only if both match theirs exactly. KServe's
file is the same service with a subset of the methods and the same numbers, but lacks ModelConfig,
which tritonclient's get_model_config calls. The methods convserve does not implement answer
UNIMPLEMENTED (the generated servicer's default).

Protobuf registers every message by its full name (inference.ModelInferRequest) in one pool per
process: a process may import this package, tritonclient.grpc or kserve's gRPC client, only one of
them (the others fail with "duplicate symbol"). The server imports only this one.
"""
