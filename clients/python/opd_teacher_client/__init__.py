"""Client of the opd teacher gRPC API (`opd.teacher.v1.TeacherService`): top-K log-probs as numpy arrays.

    from opd_teacher_client import TeacherClient

    with TeacherClient("teacher.example:50051", token="...") as teacher:
        rows = teacher.score([prompt + completion], score_from=[len(prompt)], top_k=32)

The generated messages and stubs are `opd_teacher_client.v1.teacher_pb2` and `.teacher_pb2_grpc`.
"""

from opd_teacher_client.client import ScoredRows, TeacherClient, build_sequence, decode_scored, service_config
from opd_teacher_client.v1 import teacher_pb2, teacher_pb2_grpc

__all__ = [
    "ScoredRows",
    "TeacherClient",
    "build_sequence",
    "decode_scored",
    "service_config",
    "teacher_pb2",
    "teacher_pb2_grpc",
]
