"""Noise schedules and samplers: pure functions of tensors."""

__all__: list[str] = []
