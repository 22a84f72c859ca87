"""Services of the on-policy distillation system: teacher (gRPC), rollout (HTTP), worker, shared glue."""
