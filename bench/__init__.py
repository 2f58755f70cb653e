"""Benchmarks of :func:`cmi_fused.cmi_loss` (fused vs eager vs ``torch.compile``) and of a BERT training step.

Run ``python -m bench --help``. Modules: :mod:`bench.cmi_op` (op timings), :mod:`bench.e2e` (training
step), :mod:`bench.report` (JSON, markdown and PNG output).
"""
