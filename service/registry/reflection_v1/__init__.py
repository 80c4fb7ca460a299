"""Generated code of the standard ``grpc.reflection.v1`` API (``scripts/gen_protos.py``).

Importing it registers ``grpc/reflection/v1/reflection.proto`` in the default
descriptor pool, so server reflection can describe its own v1 service.
"""
