"""The toy task (multi-digit addition with a written-out chain of thought) and its teacher/student models."""
