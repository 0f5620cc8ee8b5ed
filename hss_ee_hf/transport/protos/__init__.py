"""Generated gRPC/protobuf modules for the share-server wire format (source: `hss_ee.proto`).

Do not edit `hss_ee_pb2.py` or `hss_ee_pb2_grpc.py` by hand; regenerate them with the command at the
top of `hss_ee.proto`.
"""
