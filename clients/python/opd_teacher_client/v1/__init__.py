"""Generated code of `opd.teacher.v1` (proto/opd/teacher/v1/teacher.proto; `make proto` writes it)."""
