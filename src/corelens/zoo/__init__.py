"""Offline models: tiny random models for tests (``Family.build_tiny``) and, with the toy-model
issue, the trained toy MLLMs that ship with corelens."""
